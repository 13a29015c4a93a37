"""Class-conditional score network (small U-Net) for denoising score matching.

Used to estimate ``grad_x log p_sigma(x | y)`` (Song & Ermon's NCSN practice, as
used by Fang et al.'s data-collapse attack). Pixels are in ``[0, 1]``; the
score is in units of 1 / pixel-intensity on that scale, i.e. the DSM target
for ``x_noisy = x + sigma * z`` is ``-(x_noisy - x) / sigma**2 = -z / sigma``.
The output is *not* divided by sigma internally; with several noise levels
the training loss should weight or rescale per level (NCSNv2 uses ``s / sigma``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _groups(channels: int, max_groups: int = 32, min_per_group: int = 4) -> int:
    """Largest power-of-two divisor of ``channels`` <= ``max_groups`` keeping >= ``min_per_group`` channels each."""
    g = math.gcd(channels, max_groups)
    while g > 1 and channels // g < min_per_group:
        g //= 2
    return max(g, 1)


class CondResBlock(nn.Module):
    """GN-SiLU-conv3x3 -> GN with FiLM from the conditioning vector -> SiLU-conv3x3, plus skip.

    ``forward(x, emb)``: ``x (B, in_ch, H, W)``, ``emb (B, emb_dim)`` -> ``(B, out_ch, H, W)``.
    FiLM: ``h = GN(h) * (1 + scale) + shift`` with ``(scale, shift) = Linear(SiLU(emb))``.
    """

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(in_ch), in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.film = nn.Linear(emb_dim, 2 * out_ch)
        self.norm2 = nn.GroupNorm(_groups(out_ch), out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip: nn.Module = nn.Identity() if in_ch == out_ch else nn.Conv2d(in_ch, out_ch, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.film(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(F.silu(h))
        return h + self.skip(x)


class ScoreNet(nn.Module):
    """Small class- (and noise-level-) conditional U-Net.

    Args:
        in_channels: image channels C.
        num_classes: number of labels K (learned label embedding).
        image_size: nominal side length; ``>= 16`` -> two 2x downsamplings
            (channels ``w, 2w, 2w``), otherwise one (``w, 2w``). Inputs must have
            H and W divisible by ``2 ** num_downsamplings``.
        width: base channel count ``w`` (64 default; 16 is enough for tests/CPU).
        num_sigmas: number of noise levels L; when ``> 1`` a second learned
            embedding of ``sigma_index`` is added to the label embedding.

    ``forward(x, y, sigma_index=None)``:
        x: ``(B, C, H, W)`` float, pixels in [0, 1] (noisy images may leave the range).
        y: ``(B,)`` int64 labels in ``[0, K)``, or ``(B, K)`` float soft labels
            (mixes the label embeddings).
        sigma_index: ``(B,)`` int64 or an int in ``[0, L)``; required iff ``L > 1``.
        returns: score estimate ``(B, C, H, W)`` (see the module docstring for units).
    """

    def __init__(self, in_channels: int, num_classes: int, image_size: int, width: int = 64, num_sigmas: int = 1) -> None:
        super().__init__()
        if num_sigmas < 1 or num_classes < 1:
            raise ValueError("num_sigmas and num_classes must be >= 1")
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.num_sigmas = num_sigmas
        mults = (1, 2, 2) if image_size >= 16 else (1, 2)
        self.num_downsamplings = len(mults) - 1
        chans = [width * m for m in mults]
        emb_dim = 4 * width

        self.label_emb = nn.Embedding(num_classes, emb_dim)
        self.sigma_emb = nn.Embedding(num_sigmas, emb_dim) if num_sigmas > 1 else None
        self.conv_in = nn.Conv2d(in_channels, chans[0], 3, padding=1)

        self.enc = nn.ModuleList([CondResBlock(c, c, emb_dim) for c in chans])
        self.down = nn.ModuleList(
            [nn.Conv2d(chans[i], chans[i + 1], 3, stride=2, padding=1) for i in range(len(chans) - 1)]
        )
        self.mid = CondResBlock(chans[-1], chans[-1], emb_dim)
        self.up = nn.ModuleList([nn.Conv2d(chans[i + 1], chans[i], 3, padding=1) for i in range(len(chans) - 1)])
        self.dec = nn.ModuleList([CondResBlock(c, c, emb_dim) for c in chans[:-1]])

        self.norm_out = nn.GroupNorm(_groups(chans[0]), chans[0])
        self.conv_out = nn.Conv2d(chans[0], in_channels, 3, padding=1)

    def _embed(self, y: torch.Tensor, sigma_index: torch.Tensor | int | None, batch: int) -> torch.Tensor:
        if y.dtype.is_floating_point and y.dim() == 2:
            emb = y @ self.label_emb.weight
        else:
            emb = self.label_emb(y.long())
        if self.sigma_emb is None:
            if sigma_index is not None and torch.any(torch.as_tensor(sigma_index) != 0):
                raise ValueError("sigma_index must be None or 0 when num_sigmas == 1")
            return emb
        if sigma_index is None:
            raise ValueError(f"sigma_index is required when num_sigmas={self.num_sigmas}")
        idx = torch.as_tensor(sigma_index, device=emb.device, dtype=torch.long)
        return emb + self.sigma_emb(idx.expand(batch) if idx.dim() == 0 else idx)

    def forward(self, x: torch.Tensor, y: torch.Tensor, sigma_index: torch.Tensor | int | None = None) -> torch.Tensor:
        factor = 2**self.num_downsamplings
        if x.shape[-1] % factor or x.shape[-2] % factor:
            raise ValueError(f"H and W must be divisible by {factor}, got {tuple(x.shape[-2:])}")
        emb = self._embed(y, sigma_index, x.shape[0])

        h = self.conv_in(2.0 * x - 1.0)
        skips: list[torch.Tensor] = []
        for i, block in enumerate(self.enc):
            h = block(h, emb)
            if i < len(self.down):
                skips.append(h)
                h = self.down[i](h)
        h = self.mid(h, emb)
        for i in reversed(range(len(self.dec))):
            h = self.up[i](F.interpolate(h, scale_factor=2.0, mode="nearest")) + skips[i]
            h = self.dec[i](h, emb)
        return self.conv_out(F.silu(self.norm_out(h)))
