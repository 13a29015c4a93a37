"""A trained score network as a frozen plain module: what the robust generator and purification need from a
ScoreEstimator checkpoint, read without the LightningModule (so the data and generator code need not import it).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ue_lightning.models.checkpoint import build_checked, check_data_facts, read_lightning_checkpoint
from ue_lightning.models.score_net import ScoreNet

#: ScoreEstimator's defaults, for a checkpoint that does not save one of them
DEFAULTS = {"width": 64, "sigma": 0.1, "num_sigmas": 1, "sigma_min": 0.05, "sigma_max": 1.0}


def geometric_sigmas(sigma_max: float, sigma_min: float, num_sigmas: int) -> Tensor:
    """``num_sigmas`` noise levels from ``sigma_max`` down to ``sigma_min``, evenly spaced in log (float32)."""
    return torch.logspace(math.log10(sigma_max), math.log10(sigma_min), num_sigmas, dtype=torch.float64).float()


def training_hint(num_classes: int, in_channels: int, image_size: int) -> str:
    """How to get a score checkpoint for data with these facts (the end of every loading error)."""
    return ("train a score estimator on this dataset with configs/score/dsm.yaml "
            "(e.g. `ue fit --config configs/data/cifar10.yaml --config configs/score/dsm.yaml`, plus its overlay "
            f"configs/score/<data>/dsm.yaml where there is one; this data has {num_classes} classes, "
            f"{in_channels} channels, {image_size}x{image_size} images) and pass its last.ckpt")


class FrozenScore(nn.Module):
    """``score(x, y) = net(x, y[, level]) / sigma``: the estimated ``grad_x log p_sigma(x | y)`` (B, C, H, W), in
    1 / pixel units, of images ``x`` (B, C, H, W) in [0, 1] with labels ``y`` (B,), at the smallest noise level
    ``sigma`` (pixel units). Frozen (eval mode, no parameter gradients) but differentiable in ``x``."""

    def __init__(self, net: ScoreNet, sigma: Tensor, level: int | None):
        super().__init__()
        self.net, self.level = net, level
        self.register_buffer("sigma", sigma.reshape(()).clone(), persistent=False)
        self.eval().requires_grad_(False)

    @property
    def sigma_min(self) -> float:
        """The noise level of :meth:`score`, pixel units."""
        return float(self.sigma)

    def score(self, x: Tensor, y: Tensor) -> Tensor:
        """The score of ``x`` at any height and width: a side the U-Net cannot halve evenly is padded (edge pixels
        repeated) up to a multiple of ``2 ** net.num_downsamplings`` and the score cropped back."""
        height, width = x.shape[-2:]
        multiple = 2 ** self.net.num_downsamplings
        pad_h, pad_w = -height % multiple, -width % multiple
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
        return self.net(x, y, self.level)[..., :height, :width] / self.sigma

    forward = score


def load_frozen_score(path: str | Path, *, num_classes: int, in_channels: int, image_size: int,
                      map_location: Any = "cpu", fix: str | None = None) -> FrozenScore:
    """The score network of the ScoreEstimator checkpoint at ``path`` (its weight average when it kept one),
    read with ``weights_only=True`` and checked against the data's facts.

    Raises :class:`~ue_lightning.models.checkpoint.CheckpointError` (a ``ValueError``) for a file that is
    unreadable, of another module or made for other data, and ``CheckpointNotFoundError`` when it is missing;
    each message ends with ``fix`` (None: how to train one, :func:`training_hint`).
    """
    name, fix = f"score checkpoint {path}", fix or training_hint(num_classes, in_channels, image_size)
    hp, state = read_lightning_checkpoint(path, name="score checkpoint", fix=fix, prefix="net.",
                                          expected="ue_lightning.modules.ScoreEstimator")
    check_data_facts(hp, {"num_classes": num_classes, "in_channels": in_channels, "image_size": image_size},
                     name=name, fix=fix)
    hp = {**DEFAULTS, **hp}
    prefix = "ema_net." if any(k.startswith("ema_net.") for k in state) else "net."
    weights = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    levels = int(hp["num_sigmas"])
    net = build_checked(lambda: ScoreNet(in_channels, num_classes, image_size, width=int(hp["width"]),
                                         num_sigmas=levels), weights, name=name,
                        what="a ScoreNet of the checkpoint's own hyper-parameters", fix=fix)
    sigmas = (torch.tensor([float(hp["sigma"])]) if levels == 1
              else geometric_sigmas(float(hp["sigma_max"]), float(hp["sigma_min"]), levels))
    return FrozenScore(net, sigmas[-1], levels - 1 if levels > 1 else None).to(map_location)
