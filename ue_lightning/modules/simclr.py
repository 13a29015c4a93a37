"""SimCLR pieces shared by the TUE generator and the unsupervised victim.

* :class:`ProjectionHead`, SimCLR's projection (the learner itself, with MoCo and SimSiam, is in
  :mod:`ue_lightning.modules.contrastive`);
* :func:`nt_xent`, the normalised-temperature cross-entropy of SimCLR;
* :func:`simclr_views`: SimCLR's view augmentation (random resized crop, flip, colour
  jitter, grayscale), differentiable and drawn per sample, so gradients reach the
  input (used while optimising noise) and every image of a batch gets its own view;
* :func:`classwise_separability`, the Classwise Separability Discriminant (CSD) of TUE.

Images are float tensors (B, C, H, W) with pixels in [0, 1].
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


# ----------------------------------------------------------------------------- networks


class ProjectionHead(nn.Module):
    """SimCLR's projection g: ``Linear(d, d, bias=False) - BN - ReLU - Linear(d, out_dim)``."""

    def __init__(self, in_dim: int, out_dim: int = 128):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(in_dim, in_dim, bias=False), nn.BatchNorm1d(in_dim),
                                    nn.ReLU(inplace=True), nn.Linear(in_dim, out_dim))

    def forward(self, h: Tensor) -> Tensor:
        return self.layers(h)


# ----------------------------------------------------------------------------- losses


def nt_xent(z1: Tensor, z2: Tensor, temperature: float = 0.5) -> Tensor:
    """SimCLR's NT-Xent loss of two views' projections (B, D), mean over the 2B anchors.

    Each anchor's positive is its other view; the negatives are the other 2B - 2 views
    of the batch (on this rank only under DDP, as in the reference).
    """
    n = len(z1)
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    similarity = z @ z.T / temperature
    self_mask = torch.eye(2 * n, dtype=torch.bool, device=z.device)
    similarity = similarity.masked_fill(self_mask, float("-inf"))
    positive = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(similarity, positive)


def classwise_separability(noise: Tensor, labels: Tensor, *, detach_spread: bool = True,
                           stabilizer: float = 1e-5) -> Tensor:
    """Classwise Separability Discriminant (Ren et al., ICLR 2023) of a batch of noise.

    With the noise flattened per sample and grouped by label, class i has the centre
    ``mu_i`` and the spread ``s_i`` = mean Euclidean distance of its members to ``mu_i``;
    the loss is the mean over ordered pairs i != j of
    ``(s_i + s_j + stabilizer) / (||mu_i - mu_j|| + stabilizer)``, a Davies-Bouldin-style
    ratio that is small when the noise of each class is tight and far from the others.
    Returns 0 (with a gradient graph) if the batch holds fewer than two classes.

    Args:
        noise: (B, ...) perturbations (any units: the ratio is scale-free).
        labels: (B,) int class labels.
        detach_spread: treat the spreads as constants, so only the centre distances
            get a gradient. Default True, as the reference implementation does
            (``get_linear_noise_csd_loss`` rebuilds the spreads with ``torch.tensor``).
        stabilizer: added to numerator and denominator (1e-5 in the reference).
    """
    flat = noise.reshape(len(noise), -1)
    classes, member_of = torch.unique(labels, return_inverse=True)
    k = len(classes)
    if k < 2:
        return flat.sum() * 0.0
    one_hot = F.one_hot(member_of, k).to(flat.dtype)  # (B, K)
    counts = one_hot.sum(0)  # (K,)
    centres = (one_hot.T @ flat) / counts[:, None]  # (K, D)
    distance_to_centre = (flat - centres[member_of]).norm(dim=1)  # (B,)
    spread = (one_hot.T @ distance_to_centre) / counts  # (K,)
    if detach_spread:
        spread = spread.detach()
    i, j = torch.triu_indices(k, k, offset=1, device=flat.device)  # the ratio is symmetric in (i, j)
    centre_distance = (centres[i] - centres[j]).norm(dim=1)
    return ((spread[i] + spread[j] + stabilizer) / (centre_distance + stabilizer)).mean()


# ----------------------------------------------------------------------------- augmentations

_LUMA = (0.299, 0.587, 0.114)


def _rand(n: int, x: Tensor, generator: torch.Generator | None) -> Tensor:
    if generator is None:
        return torch.rand(n, device=x.device, dtype=x.dtype)
    return torch.rand(n, generator=generator).to(device=x.device, dtype=x.dtype)


def _uniform(low: float, high: float, n: int, x: Tensor, generator: torch.Generator | None) -> Tensor:
    return low + (high - low) * _rand(n, x, generator)


def random_resized_crop_flip(x: Tensor, out_size: int | None = None, *, scale: Sequence[float] = (0.08, 1.0),
                             ratio: Sequence[float] = (3 / 4, 4 / 3), flip_p: float = 0.5,
                             generator: torch.Generator | None = None) -> Tensor:
    """Per-sample random resized crop (bilinear) and horizontal flip, differentiable in ``x``.

    Each sample draws an area fraction in ``scale`` and an aspect ratio (log-uniform in
    ``ratio``), clipped to the image, at a uniformly random position; the crop is
    resampled to ``out_size`` (default: the input size) by ``grid_sample``.
    """
    b, _, h, w = x.shape
    out_size = out_size or h
    area = _uniform(scale[0], scale[1], b, x, generator)
    aspect = torch.exp(_uniform(math.log(ratio[0]), math.log(ratio[1]), b, x, generator))
    crop_w = torch.sqrt(area * aspect).clamp(max=1.0)  # fractions of the image side
    crop_h = torch.sqrt(area / aspect).clamp(max=1.0)
    centre_x = (2 * _rand(b, x, generator) - 1) * (1 - crop_w)  # in grid units [-1, 1]
    centre_y = (2 * _rand(b, x, generator) - 1) * (1 - crop_h)
    mirror = torch.where(_rand(b, x, generator) < flip_p, -1.0, 1.0).to(x.dtype)
    theta = torch.zeros(b, 2, 3, device=x.device, dtype=x.dtype)
    theta[:, 0, 0] = crop_w * mirror
    theta[:, 0, 2] = centre_x
    theta[:, 1, 1] = crop_h
    theta[:, 1, 2] = centre_y
    grid = F.affine_grid(theta, [b, x.shape[1], out_size, out_size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _luma(x: Tensor) -> Tensor:
    """(B, 1, H, W) grey level of RGB images (ITU-R 601 weights, as torchvision)."""
    weights = torch.tensor(_LUMA, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x * weights).sum(1, keepdim=True)


def _rotate_hue(x: Tensor, turns: Tensor) -> Tensor:
    """Rotate the chroma of RGB images about the grey axis by ``turns`` (B,) of a full circle.

    A differentiable stand-in for torchvision's HSV hue shift (same effect for small shifts).
    """
    angle = 2 * math.pi * turns
    cos, sin = torch.cos(angle)[:, None, None], torch.sin(angle)[:, None, None]
    u = torch.full((3,), 1 / math.sqrt(3), device=x.device, dtype=x.dtype)
    cross = torch.tensor([[0.0, -1.0, 1.0], [1.0, 0.0, -1.0], [-1.0, 1.0, 0.0]], device=x.device,
                         dtype=x.dtype) / math.sqrt(3)
    eye = torch.eye(3, device=x.device, dtype=x.dtype)
    rotation = cos * eye + sin * cross + (1 - cos) * torch.outer(u, u)  # Rodrigues, (B, 3, 3)
    return torch.einsum("bij,bjhw->bihw", rotation, x)


def color_jitter(x: Tensor, brightness: float = 0.4, contrast: float = 0.4, saturation: float = 0.4,
                 hue: float = 0.1, p: float = 0.8, *, generator: torch.Generator | None = None) -> Tensor:
    """Per-sample colour jitter applied with probability ``p``, differentiable in ``x``.

    Factors are drawn as in torchvision (brightness/contrast/saturation in [1-s, 1+s],
    hue shift in [-hue, hue] turns) and applied in that fixed order, clamping to [0, 1]
    after each. Images with other than 3 channels get brightness and contrast only.
    """
    b = len(x)
    view = (b, 1, 1, 1)
    out = (x * _uniform(1 - brightness, 1 + brightness, b, x, generator).view(view)).clamp(0, 1)
    grey = _luma(out) if x.shape[1] == 3 else out.mean(1, keepdim=True)
    c = _uniform(1 - contrast, 1 + contrast, b, x, generator).view(view)
    out = (c * out + (1 - c) * grey.mean((2, 3), keepdim=True)).clamp(0, 1)
    if x.shape[1] == 3:
        s = _uniform(1 - saturation, 1 + saturation, b, x, generator).view(view)
        out = (s * out + (1 - s) * _luma(out)).clamp(0, 1)
        out = _rotate_hue(out, _uniform(-hue, hue, b, x, generator)).clamp(0, 1)
    apply = (_rand(b, x, generator) < p).view(view)
    return torch.where(apply, out, x)


def random_grayscale(x: Tensor, p: float = 0.2, *, generator: torch.Generator | None = None) -> Tensor:
    """Replace RGB images by their grey level (kept 3-channel) with probability ``p`` each."""
    if x.shape[1] != 3:
        return x
    apply = (_rand(len(x), x, generator) < p).view(-1, 1, 1, 1)
    return torch.where(apply, _luma(x).expand_as(x), x)


def simclr_views(x: Tensor, out_size: int | None = None, *, crop_scale: Sequence[float] = (0.08, 1.0),
                 flip_p: float = 0.5, jitter: Sequence[float] = (0.4, 0.4, 0.4, 0.1), jitter_p: float = 0.8,
                 grayscale_p: float = 0.2, generator: torch.Generator | None = None) -> Tensor:
    """One SimCLR view of each image (CIFAR recipe of the TUE reference), drawn per sample.

    RandomResizedCrop(``out_size``, scale ``crop_scale``) + horizontal flip (``flip_p``) +
    colour jitter (``jitter`` = brightness, contrast, saturation, hue, with probability
    ``jitter_p``) + grayscale (``grayscale_p``). Differentiable in ``x``.
    """
    x = random_resized_crop_flip(x, out_size, scale=crop_scale, flip_p=flip_p, generator=generator)
    x = color_jitter(x, *jitter, p=jitter_p, generator=generator)
    return random_grayscale(x, grayscale_p, generator=generator)
