"""The noise of one image at its own size: PGD descent on a frozen surrogate (sample-wise), or a class pattern."""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.transforms.v2 import functional as TF

from ue_lightning.attacks import budget_to_pixels, logit_margin_sum, pgd_minimize
from ue_lightning.data.noise_file import quantize_delta
from ue_lightning.protect.surrogate import Surrogate, match_channels


def error_minimizing_delta(surrogate: Surrogate, colour: Tensor, label: int, *, epsilon: float, steps: int,
                           step_size: float) -> Tensor:
    """int8 noise (C, H, W) in 1/255 units for the uint8 image ``colour`` (C, H, W), 0-255.

    ``steps`` sign steps of ``step_size`` (1/255 units) from zero, descending the surrogate's
    loss for ``label`` within ``epsilon`` (1/255 units); input gradients only
    (:func:`~ue_lightning.attacks.pgd_minimize`). The loss is the logit margin, whose sign
    steps are cross-entropy's, because a surrogate that knows the image already has a
    cross-entropy gradient of exactly zero (no noise at all) in float32. Rounded to nearest against the image,
    ``colour + delta`` stays in 0-255 and ``|delta| <= floor(epsilon)``.
    """
    device = next(surrogate.model.parameters()).device
    x = colour.unsqueeze(0).to(device=device, dtype=torch.float32) / 255.0
    y = torch.tensor([label], device=device)
    delta = pgd_minimize(logit_margin_sum(surrogate, y), x, radius=budget_to_pixels(epsilon, "epsilon"),
                         step_size=budget_to_pixels(step_size, "step_size"), steps=steps)
    return quantize_delta(colour.unsqueeze(0), delta.cpu(), epsilon)[0]


def predicted_label(surrogate: Surrogate, colour: Tensor) -> int:
    """The surrogate's class for the clean uint8 image ``colour`` (C, H, W): a flat set's label."""
    device = next(surrogate.model.parameters()).device
    return int(surrogate.predict(colour.unsqueeze(0).to(device=device, dtype=torch.float32) / 255.0)[0])


def class_pattern_delta(pattern: Tensor, colour: Tensor, epsilon: float) -> Tensor:
    """int8 noise (C, H, W) in 1/255 units: a class pattern stretched over the uint8 image ``colour`` (C, H, W).

    ``pattern`` (c, h, w) is in pixel units within ``epsilon`` (1/255 units); it is resized
    to (H, W) (bilinear: values stay within the budget), its channels matched to the image's
    (:func:`~ue_lightning.protect.surrogate.match_channels`), and rounded against the image.
    A victim that shrinks the image to its input size sees about the pattern again.
    """
    stretched = TF.resize(pattern.unsqueeze(0).float(), list(colour.shape[1:]), antialias=True)
    stretched = match_channels(stretched, colour.shape[0])
    return quantize_delta(colour.unsqueeze(0), stretched, epsilon)[0]
