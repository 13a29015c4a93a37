"""How much a protected photo differs from its original: max |delta|, PSNR and SSIM of the colour channels."""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

SSIM_MIN_SIDE = 11  # the Gaussian window of SSIM
SSIM_MAX_SIDE = 1024  # SSIM of a larger photo: its central square of this side


def image_quality(clean: Tensor, protected: Tensor) -> dict[str, float | int | None]:
    """``max_abs_delta`` (1/255 units), ``psnr_db`` and ``ssim`` of uint8 (C, H, W) images.

    PSNR is None (infinite) for identical images; SSIM is None below 11 pixels a side, and for a
    photo larger than ``SSIM_MAX_SIDE`` a side it is the SSIM of the central ``SSIM_MAX_SIDE``
    square (the whole of a 12-MP photo costs ~13 s of a CPU thread; PSNR is always the whole).
    """
    delta = protected.to(torch.int16) - clean.to(torch.int16)
    x, p = clean.unsqueeze(0).float() / 255.0, protected.unsqueeze(0).float() / 255.0
    identical = not bool(delta.any())
    psnr = None if identical else float(peak_signal_noise_ratio(p, x, data_range=1.0))
    ssim = None
    if min(clean.shape[1:]) >= SSIM_MIN_SIDE:
        x, p = _central(x, SSIM_MAX_SIDE), _central(p, SSIM_MAX_SIDE)
        ssim = float(structural_similarity_index_measure(p, x, data_range=1.0))
    return {"max_abs_delta": int(delta.abs().max()), "psnr_db": psnr, "ssim": ssim}


def _central(x: Tensor, side: int) -> Tensor:
    """The central at most ``side x side`` pixels of ``x`` (B, C, H, W)."""
    h, w = x.shape[-2:]
    top, left = max(0, (h - side) // 2), max(0, (w - side) // 2)
    return x[..., top:top + side, left:left + side]
