"""What a photo site does to a published photo (re-encode as JPEG, resize), and a JPEG that PGD can see through.

``ue protect --verify`` puts the photos through each platform before its victims train
(:mod:`.verify`); ``--eot_jpeg`` makes error-minimising noise through a JPEG round trip, so the
noise that survives the platform is the noise that is kept (:func:`through_jpeg`).
"""

from __future__ import annotations

import io
from typing import Callable

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torchvision.transforms.v2 import functional as TF

#: ``uint8 (3, H, W) -> uint8 (3, h, w)``: what a platform does to a photo.
PlatformFn = Callable[[Tensor], Tensor]
DEFAULT_PLATFORMS = ("jpeg:75", "resize:0.5")


def jpeg(quality: int) -> PlatformFn:
    """Re-encode as JPEG at ``quality`` (PIL's encoder, 4:2:0 chroma as most sites use) and decode."""
    def apply(image: Tensor) -> Tensor:
        buffer = io.BytesIO()
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(buffer, format="JPEG", quality=quality)
        decoded = np.array(Image.open(buffer).convert("RGB"))
        return torch.from_numpy(decoded).permute(2, 0, 1).contiguous()
    return apply


def resize(scale: float) -> PlatformFn:
    """Resize by ``scale`` (each side; antialiased, rounded to whole pixels, at least 1)."""
    def apply(image: Tensor) -> Tensor:
        h, w = image.shape[1:]
        return TF.resize(image, [max(1, round(h * scale)), max(1, round(w * scale))], antialias=True)
    return apply


def parse_platform(spec: str) -> tuple[str, PlatformFn]:
    """``jpeg:<quality 1-95>`` or ``resize:<scale in (0, 1]>`` -> ``(name, function)``."""
    kind, _, value = spec.partition(":")
    try:
        if kind == "jpeg" and 1 <= int(value) <= 95:
            return f"JPEG {int(value)}", jpeg(int(value))
        if kind == "resize" and 0 < float(value) <= 1:
            return f"resize x{float(value):g}", resize(float(value))
    except ValueError:
        pass
    raise ValueError(f"--verify_platforms: {spec!r} is not a platform: write jpeg:<quality 1-95> or "
                     "resize:<scale in (0, 1]>, e.g. jpeg:75 or resize:0.5")


def through_jpeg(x: Tensor, quality: int) -> Tensor:
    """``x`` (B, C, H, W) in [0, 1] as a JPEG round trip at ``quality`` gives it back (:func:`jpeg`, on the pixel
    grid), with the gradient of the identity: JPEG's rounding has none worth following, so PGD steps through it
    as if it were not there (BPDA, Athalye et al. 2018) while its loss is that of the re-encoded photo.
    Ours for data owners: none of the three source texts makes noise through a platform's JPEG.
    Grey images (C = 1) go through as RGB and come back as their channel mean."""
    code = jpeg(quality)
    with torch.no_grad():
        pixels = (x.detach() * 255).round().clamp(0, 255).to(torch.uint8).cpu()
        rgb = pixels.expand(-1, 3, -1, -1)
        back = torch.stack([code(image) for image in rgb]).to(device=x.device, dtype=x.dtype) / 255
        if x.shape[1] != 3:
            back = back.mean(dim=1, keepdim=True)
    return x + (back - x).detach()
