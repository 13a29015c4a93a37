"""Differentiable, per-sample random augmentations for noise optimisation.

Gradients flow through these to the perturbation (expectation over transformations,
EOT). Parameters are drawn per sample, either from torch's RNG or, when ``index`` is
given, from :func:`~ue_lightning.ops.sample_rng.indexed_uniform` so that a sample's
augmentation does not depend on its batch or rank.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ue_lightning.ops.sample_rng import indexed_uniform


def _uniform(n: int, k: int, device: torch.device, index: Tensor | None, seed: int, salt: int) -> Tensor:
    if index is None:
        return torch.rand(n, k, device=device)
    return indexed_uniform(index, (k,), seed, salt).to(device)


def crop_flip(x: Tensor, shift_y: Tensor, shift_x: Tensor, flip: Tensor, padding: int) -> Tensor:
    """Zero-pad by ``padding``, crop back at per-sample offsets, mirror where ``flip``.

    Args:
        x: (B, C, H, W) images in [0, 1].
        shift_y, shift_x: int64 (B,) crop offsets in [0, 2 * padding].
        flip: bool (B,), mirror horizontally.
    """
    b, c, h, w = x.shape
    padded = F.pad(x, (padding,) * 4)
    rows = shift_y[:, None] + torch.arange(h, device=x.device)  # (B, H)
    cols = shift_x[:, None] + torch.arange(w, device=x.device)  # (B, W)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    flat = (rows[:, :, None] * (w + 2 * padding) + cols[:, None, :]).reshape(b, 1, h * w)  # (B, 1, H*W)
    out = padded.reshape(b, c, -1).gather(2, flat.expand(b, c, h * w))
    return out.reshape(b, c, h, w)


def random_crop_flip(x: Tensor, padding: int, flip: bool = True, *, index: Tensor | None = None,
                     seed: int = 0, salt: int = 0) -> Tensor:
    """CIFAR's training augmentation (crop with ``padding``, horizontal flip), differentiable.

    Each sample draws its own offsets and flip; with ``index`` the draw is a function of
    (seed, index, salt) only.
    """
    u = _uniform(len(x), 3, x.device, index, seed, salt)
    span = 2 * padding + 1
    shift_y = (u[:, 0] * span).long().clamp_(max=span - 1)
    shift_x = (u[:, 1] * span).long().clamp_(max=span - 1)
    mirror = (u[:, 2] < 0.5) if flip else torch.zeros(len(x), dtype=torch.bool, device=x.device)
    return crop_flip(x, shift_y, shift_x, mirror, padding)
