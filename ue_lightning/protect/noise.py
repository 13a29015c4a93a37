"""The noise of a batch of same-size images: PGD descent on a frozen surrogate (sample-wise), or a class pattern.

Large photos get their noise at a working size (:func:`working_shape`): PGD runs on the image
shrunk so its longer side is ``working_size``, and the noise is stretched back over the full
image. A model that trains on photos shrinks them to its input size (224 px or less), so noise
made at full resolution would be averaged away there; and PGD at 12 MP costs ~100x more.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch
from torch import Tensor, nn
from torchvision.transforms.v2 import functional as TF

from ue_lightning.ops.attacks import budget_to_pixels, logit_margin_sum, pgd_minimize
from ue_lightning.data.delta import quantize_delta
from ue_lightning.protect.platforms import through_jpeg

#: ``(x (B, C, h, w) in [0, 1], labels (B,)) -> float noise (B, C, h, w), pixel units``.
PixelNoise = Callable[[Tensor, Tensor], Tensor]


class AlternatingViews:
    """A loss callable that sees the batch as given on its 1st, 3rd, ... call and through ``view`` on its 2nd, 4th,
    ...: inside :func:`~ue_lightning.ops.attacks.pgd_minimize`, which calls its loss once a step, an expectation
    over the two views taken across steps, at one surrogate pass a step."""

    def __init__(self, loss: Callable[[Tensor], Tensor], view: Callable[[Tensor], Tensor]):
        self.loss, self.view, self.calls = loss, view, 0

    def __call__(self, z: Tensor) -> Tensor:
        self.calls += 1
        return self.loss(z if self.calls % 2 else self.view(z))


def match_channels(x: Tensor, channels: int) -> Tensor:
    """``x`` (B, 1 or 3, H, W) as a model with ``channels`` inputs sees it, differentiably.

    Grey is repeated to RGB; RGB is averaged to grey. So noise stays in the image's own
    channels whatever the surrogate was trained on.
    """
    if x.shape[1] == channels:
        return x
    if channels == 1:
        return x.mean(dim=1, keepdim=True)
    return x.expand(-1, channels, -1, -1) if x.shape[1] == 1 else x[:, :channels]


@dataclass
class Surrogate:
    """A frozen classifier in eval mode (pixels in [0, 1] -> logits), on ``device``.

    Attributes:
        model: the classifier; its parameters do not require gradients.
        num_classes: its number of logits.
        in_channels: the channels it was trained on (images are matched to them).
        source: where it came from (a checkpoint path).
    """

    model: nn.Module
    num_classes: int
    in_channels: int
    source: str

    def __call__(self, x: Tensor) -> Tensor:
        """Logits (B, num_classes) of images (B, 1 or 3, H, W) in [0, 1]."""
        return self.model(match_channels(x, self.in_channels))

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        """int64 (B,): the predicted class of each image."""
        return self(x).argmax(dim=1)


def working_shape(height: int, width: int, working_size: int | None) -> tuple[int, int]:
    """(h, w) the noise of an image of ``height x width`` pixels is made at: the image itself when its longer side
    is at most ``working_size`` (or ``working_size`` is None), else shrunk (aspect kept) to that longer side."""
    longer = max(height, width)
    if working_size is None or longer <= working_size:
        return height, width
    scale = working_size / longer
    return max(1, round(height * scale)), max(1, round(width * scale))


def at_working_size(make_noise: PixelNoise, colours: Tensor, labels: Tensor, epsilon: float,
                    working_size: int | None, device: torch.device) -> Tensor:
    """int8 noise (B, C, H, W) in 1/255 units for uint8 images ``colours`` (B, C, H, W), 0-255, of one size.

    ``make_noise`` runs at :func:`working_shape` (images shrunk with antialiasing); its noise is
    stretched back (bilinear: values stay inside the budget) and rounded against the full
    images, so ``colours + delta`` stays in 0-255 and ``|delta| <= floor(epsilon)``.
    """
    full = list(colours.shape[-2:])
    small = list(working_shape(*full, working_size))
    x = colours.to(device=device, dtype=torch.float32) / 255.0
    if small != full:
        x = TF.resize(x, small, antialias=True).clamp(0.0, 1.0)
    delta = make_noise(x, labels.to(device))
    if small != full:
        delta = TF.resize(delta, full, antialias=False)
    return quantize_delta(colours, delta.cpu(), epsilon)


def error_minimizing_deltas(surrogate: Surrogate, colours: Tensor, labels: Tensor, *, epsilon: float, steps: int,
                            step_size: float, working_size: int | None = None, eot_jpeg: int = 0,
                            eot_views: Literal["both", "alternate"] = "both") -> Tensor:
    """int8 noise (B, C, H, W) in 1/255 units for a batch of same-size uint8 images ``colours`` (B, C, H, W).

    ``steps`` sign steps of ``step_size`` (1/255 units) from zero, descending the surrogate's
    loss for ``labels`` (B,) within ``epsilon`` (1/255 units); input gradients only
    (:func:`~ue_lightning.ops.attacks.pgd_minimize`). The loss is the logit margin, whose sign
    steps are cross-entropy's, because a surrogate that knows the image already has a
    cross-entropy gradient of exactly zero (no noise at all) in float32. The surrogate is in
    eval mode and the loss a sum, so each image's noise is the one it gets alone (batching
    changes only float rounding). At :func:`working_shape` for large images.

    ``eot_jpeg`` (a JPEG quality, 0: off): the loss is that of the photo as written plus that of its JPEG round
    trip at this quality (:func:`~ue_lightning.protect.platforms.through_jpeg`), so the noise minimises both: an
    expectation over the two ways the photo may be seen (EOT). ``eot_views``: ``both`` views every step (twice
    the surrogate passes a step), or ``alternate``: the photo as written on even steps, its round trip on odd ones
    (the cost of plain EM; the expectation taken over steps instead of within each).
    """
    device = next(surrogate.model.parameters()).device
    radius, alpha = budget_to_pixels(epsilon, "epsilon"), budget_to_pixels(step_size, "step_size")

    def descend(x: Tensor, y: Tensor) -> Tensor:
        loss = logit_margin_sum(surrogate, y)
        if eot_jpeg and eot_views == "alternate":
            loss = AlternatingViews(loss, lambda z: through_jpeg(z, eot_jpeg))
        elif eot_jpeg:
            plain = loss
            loss = lambda z: plain(z) + plain(through_jpeg(z, eot_jpeg))  # noqa: E731
        return pgd_minimize(loss, x, radius=radius, step_size=alpha, steps=steps)

    return at_working_size(descend, colours, labels, epsilon, working_size, device)


def error_minimizing_delta(surrogate: Surrogate, colour: Tensor, label: int, *, epsilon: float, steps: int,
                           step_size: float, working_size: int | None = None) -> Tensor:
    """int8 noise (C, H, W) in 1/255 units for one uint8 image ``colour`` (C, H, W): :func:`error_minimizing_deltas`."""
    return error_minimizing_deltas(surrogate, colour.unsqueeze(0), torch.tensor([label]), epsilon=epsilon,
                                   steps=steps, step_size=step_size, working_size=working_size)[0]


def predicted_labels(surrogate: Surrogate, colours: Tensor) -> Tensor:
    """int64 (B,): the surrogate's class for each clean uint8 image of ``colours`` (B, C, H, W), a flat set's labels."""
    device = next(surrogate.model.parameters()).device
    return surrogate.predict(colours.to(device=device, dtype=torch.float32) / 255.0).cpu()


def predicted_label(surrogate: Surrogate, colour: Tensor) -> int:
    """The surrogate's class for the clean uint8 image ``colour`` (C, H, W): a flat set's label."""
    return int(predicted_labels(surrogate, colour.unsqueeze(0))[0])


def class_pattern_delta(pattern: Tensor, colour: Tensor, epsilon: float) -> Tensor:
    """int8 noise (C, H, W) in 1/255 units: a class pattern stretched over the uint8 image ``colour`` (C, H, W).

    ``pattern`` (c, h, w) is in pixel units within ``epsilon`` (1/255 units); it is resized
    to (H, W) (bilinear: values stay within the budget), its channels matched to the image's
    (:func:`match_channels`), and rounded against the image.
    A victim that shrinks the image to its input size sees about the pattern again.
    """
    stretched = TF.resize(pattern.unsqueeze(0).float(), list(colour.shape[1:]), antialias=True)
    stretched = match_channels(stretched, colour.shape[0])
    return quantize_delta(colour.unsqueeze(0), stretched, epsilon)[0]
