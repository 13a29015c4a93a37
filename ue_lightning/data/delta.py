"""The noise as the noise file holds it: int8 steps of 1/255 added to uint8 pixels (0-255).

Pixel arithmetic only (no file, no package import): the noise file, the DataModule, the pictures and
``ue protect`` share it.
"""

from __future__ import annotations

import torch
from torch import Tensor


def quantize_delta(clean_uint8: Tensor, delta: Tensor, epsilon: float | None = None) -> Tensor:
    """Round a float perturbation to the int8 delta of the noise file.

    Args:
        clean_uint8: clean images, uint8 (B, C, H, W), 0-255.
        delta: float perturbation in pixel units ([0, 1] images), same shape.
        epsilon: budget in 1/255 units; with a non-integer budget (8.5) rounding could
            reach 9, so the result is also clipped to ``floor(epsilon)``.

    Returns:
        int8 delta in 1/255 units with ``clean + delta`` in [0, 255], rounded to nearest.
    """
    clean = clean_uint8.to(torch.float32)
    shift = (delta.to(torch.float32) * 255.0).round()
    if epsilon is not None:
        bound = float(int(epsilon + 1e-6))
        shift = shift.clamp(-bound, bound)
    protected = (clean + shift).clamp(0, 255)
    return (protected - clean).to(torch.int8)


def apply_delta(clean_uint8: Tensor, delta_int8: Tensor) -> Tensor:
    """``clip(clean + delta, 0, 255)`` as uint8; exact for sample-wise noise files."""
    return (clean_uint8.to(torch.int16) + delta_int8.to(torch.int16)).clamp_(0, 255).to(torch.uint8)
