"""The picture grid ``clean | noise (amplified) | protected``, one row per image, for reports and TensorBoard.

Images may differ in size and channels (1 grey, 3 RGB); each panel is fitted into a
``box`` x ``box`` square (shrunk with antialiasing, small images enlarged by pixel
repetition so their pixels stay visible), on white.
"""

from __future__ import annotations

from typing import Sequence

import torch
from PIL import Image, ImageDraw
from torch import Tensor
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF
from torchvision.utils import make_grid

from ue_lightning.data.delta import apply_delta

PADDING = 4


def noise_picture(delta: Tensor, epsilon: float) -> Tensor:
    """uint8 (C, H, W) showing int8 ``delta`` (1/255 units) amplified: -epsilon is black, 0 grey, +epsilon white."""
    scale = 127.5 / max(float(epsilon), 1.0)
    return (delta.float() * scale + 127.5).round().clamp(0, 255).to(torch.uint8)


def _as_rgb(image: Tensor) -> Tensor:
    """uint8 (3, H, W) from (1, H, W) grey or (3, H, W) colour."""
    return image.expand(3, -1, -1) if image.shape[0] == 1 else image[:3]


def _fit(image: Tensor, box: int, exact_pixels: bool) -> Tensor:
    """uint8 (3, box, box): ``image`` scaled to fit the box (keeping its aspect) and centred on white."""
    _, h, w = image.shape
    if max(h, w) <= box:  # enlarge by a whole factor: every pixel a block, no new detail
        factor = box // max(h, w)
        size, mode = [h * factor, w * factor], InterpolationMode.NEAREST_EXACT
    else:
        size = [max(1, round(h * box / max(h, w))), max(1, round(w * box / max(h, w)))]
        mode = InterpolationMode.NEAREST_EXACT if exact_pixels else InterpolationMode.BILINEAR
    image = TF.resize(image, size, interpolation=mode, antialias=mode == InterpolationMode.BILINEAR)
    canvas = torch.full((3, box, box), 255, dtype=torch.uint8)
    top, left = (box - size[0]) // 2, (box - size[1]) // 2
    canvas[:, top:top + size[0], left:left + size[1]] = image
    return canvas


def perturbation_grid(clean: Sequence[Tensor], delta: Sequence[Tensor], epsilon: float, box: int = 160) -> Tensor:
    """uint8 (3, H, W): a row ``clean | noise | protected`` per image.

    Args:
        clean: uint8 images (C, H, W), 0-255, C = 1 or 3 (sizes may differ).
        delta: int8 noise (C, H, W) of each, in 1/255 units.
        epsilon: the budget in 1/255 units (the noise panel spans -epsilon .. +epsilon).
        box: side of each panel in pixels.
    """
    panels = []
    for image, noise in zip(clean, delta):
        panels += [_fit(_as_rgb(image), box, False), _fit(_as_rgb(noise_picture(noise, epsilon)), box, True),
                   _fit(_as_rgb(apply_delta(image, noise)), box, False)]
    return make_grid(torch.stack(panels), nrow=3, padding=PADDING, pad_value=255)


def titled(grid: Tensor, epsilon: float, box: int = 160) -> Image.Image:
    """The grid as a PIL image with the three column titles above it."""
    amplification = 127.5 / max(float(epsilon), 1.0)
    titles = ("clean", f"noise (x{amplification:.0f}, grey = 0)", "protected")
    body = Image.fromarray(grid.permute(1, 2, 0).numpy())
    page = Image.new("RGB", (body.width, body.height + 18), "white")
    page.paste(body, (0, 18))
    draw = ImageDraw.Draw(page)
    for column, title in enumerate(titles):
        centre = PADDING + column * (box + PADDING) + box // 2
        draw.text((centre, 10), title, fill="black", anchor="mm")
    return page
