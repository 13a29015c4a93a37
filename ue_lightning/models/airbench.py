"""A fast small-image classifier in the spirit of airbench (Keller Jordan's fast CIFAR-10 training).

Written for this package from the ideas airbench describes, not from its code:

* a first 2x2 convolution (no padding) whose weights are *frozen* and whiten the image's
  2x2 patches: ``W = [V / sqrt(lambda + eps); -V / sqrt(lambda + eps)]`` from the eigen-
  decomposition ``V diag(lambda) V^T`` of the patch covariance of (normalised) train
  images, so its ``2 * 4 * C`` outputs are decorrelated, unit-variance patch components of
  both signs; only its bias trains. Until :meth:`PatchWhitening.fit` is called it holds
  the whitening of the identity covariance (each patch pixel, both signs);
  :class:`~ue_lightning.modules.VictimClassifier` fits it from its first train batches;
* three groups ``conv3x3 -> max-pool 2 -> BN -> GELU -> conv3x3 -> BN -> GELU`` with
  ``w, 4w, 4w`` channels (airbench's 64, 256, 256 at the default ``w = 64``); convs
  without bias, their first ``min(in, out)`` filters initialised to the identity (Dirac);
  BatchNorm with a frozen unit scale (only the shift trains) and momentum 0.4;
* a global max-pool, features scaled by 1/9, and a linear head without bias.

Like every RGB classifier of the package it runs in channels-last memory layout (PyTorch's
CPU max-pool is about 3x faster in it; ``ImageClassifier`` converts the batch). Max-pools use
``ceil_mode``, so any input of at least 2x2 pixels works (8, 16, 32 px and more; the network
has one form at every size). Output of the backbone: ``(B, 4 * width)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .normalize import ImageClassifier, Normalize

#: Side of the whitened patches, pixels.
PATCH = 2
#: Added to the patch covariance's eigenvalues before the inverse square root (normalised units^2).
WHITENING_EPS = 5e-4
#: Logit scale of the head (airbench's 1/9): small logits at the start of a short, fast schedule.
FEATURE_SCALE = 1 / 9


class PatchWhitening(nn.Module):
    """Frozen 2x2 patch-whitening convolution with a trainable bias.

    Shapes: ``(B, C, H, W) -> (B, 8 C, H - 1, W - 1)``. ``conv.weight`` (``(8C, C, 2, 2)``)
    never trains (``requires_grad=False``) but is saved in the state dict with ``fitted``
    (a bool buffer: whether :meth:`fit` has set it from data).
    """

    fitted: Tensor

    def __init__(self, in_channels: int, eps: float = WHITENING_EPS) -> None:
        super().__init__()
        self.eps = eps
        dim = in_channels * PATCH * PATCH
        self.conv = nn.Conv2d(in_channels, 2 * dim, kernel_size=PATCH, bias=True)
        self.conv.weight.requires_grad_(False)
        nn.init.zeros_(self.conv.bias)
        self.register_buffer("fitted", torch.tensor(False))
        self._set_weight(torch.eye(dim))

    @property
    def dim(self) -> int:
        """Values in one patch, ``C * 2 * 2``."""
        return self.conv.in_channels * PATCH * PATCH

    @staticmethod
    def patch_covariance(x: Tensor) -> Tensor:
        """Covariance ``(D, D)`` of every 2x2 patch (stride 1) of ``x`` ``(B, C, H, W)``, ``D = 4 C``."""
        patches = F.unfold(x, PATCH).transpose(1, 2).reshape(-1, x.shape[1] * PATCH * PATCH)
        centred = patches - patches.mean(0)
        return centred.T @ centred / max(1, len(centred) - 1)

    @torch.no_grad()
    def fit(self, covariance: Tensor) -> None:
        """Set the weights to whiten patches of covariance ``(D, D)``; marks the layer fitted."""
        if covariance.shape != (self.dim, self.dim):
            raise ValueError(f"covariance must be {self.dim}x{self.dim}, got {tuple(covariance.shape)}")
        self._set_weight(covariance)
        self.fitted.fill_(True)

    def _set_weight(self, covariance: Tensor) -> None:
        covariance = covariance.to(self.conv.weight)
        eigenvalues, eigenvectors = torch.linalg.eigh((covariance + covariance.T) / 2)
        filters = (eigenvectors / (eigenvalues.clamp_min(0) + self.eps).sqrt()).T  # row k: component k
        filters = filters.reshape(self.dim, self.conv.in_channels, PATCH, PATCH)
        with torch.no_grad():
            self.conv.weight.copy_(torch.cat([filters, -filters]))

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


def _batchnorm(channels: int) -> nn.BatchNorm2d:
    """BatchNorm whose scale stays 1 (not trained); the shift trains. Momentum 0.4 (PyTorch's convention)."""
    bn = nn.BatchNorm2d(channels, momentum=0.4)
    bn.weight.requires_grad_(False)
    return bn


def _conv(in_ch: int, out_ch: int) -> nn.Conv2d:
    """3x3 same-padding conv, no bias; default init, then identity (Dirac) on the first ``min(in, out)`` filters."""
    conv = nn.Conv2d(in_ch, out_ch, kernel_size=3, padding=1, bias=False)
    with torch.no_grad():
        n = min(in_ch, out_ch)
        nn.init.dirac_(conv.weight[:n, :n])
    return conv


class ConvGroup(nn.Sequential):
    """``conv -> max-pool 2 (ceil) -> BN -> GELU -> conv -> BN -> GELU``: ``(B, in, H, W) -> (B, out, ceil(H/2), ceil(W/2))``."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__(
            _conv(in_ch, out_ch), nn.MaxPool2d(2, ceil_mode=True), _batchnorm(out_ch), nn.GELU(),
            _conv(out_ch, out_ch), _batchnorm(out_ch), nn.GELU(),
        )


class AirbenchBackbone(nn.Module):
    """Whitening, GELU, three :class:`ConvGroup` (``w, 4w, 4w``), global max-pool, x 1/9.

    ``(B, C, H, W)`` normalised images -> features ``(B, 4 * width)``.
    """

    def __init__(self, in_channels: int = 3, width: int = 64) -> None:
        super().__init__()
        self.whiten = PatchWhitening(in_channels)
        widths = (width, 4 * width, 4 * width)
        groups, ch = [], 2 * self.whiten.dim
        for out in widths:
            groups.append(ConvGroup(ch, out))
            ch = out
        self.groups = nn.Sequential(*groups)
        self.out_features = ch

    def forward(self, x: Tensor) -> Tensor:
        h = self.groups(F.gelu(self.whiten(x)))
        return F.adaptive_max_pool2d(h, 1).flatten(1) * FEATURE_SCALE


def airbench_classifier(
    num_classes: int,
    in_channels: int = 3,
    width: int = 64,
    mean: float | Sequence[float] | None = None,
    std: float | Sequence[float] | None = None,
) -> ImageClassifier:
    """The airbench-style net; ``width`` = first group's channels (default 64, about 1.97M params at 3 channels)."""
    backbone = AirbenchBackbone(in_channels, width)
    head = nn.Linear(backbone.out_features, num_classes, bias=False)
    return ImageClassifier(backbone, head, Normalize(mean, std, in_channels))
