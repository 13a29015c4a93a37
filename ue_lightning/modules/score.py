"""ScoreEstimator: class-conditional denoising score matching (Fang et al., Sec. 3.2, Eq. 5).

Learns ``s(x, y) ~ grad_x log p_sigma(x | y)``, the score of the class-conditional data
density smoothed by Gaussian noise of standard deviation ``sigma``, by denoising score
matching (Vincent, 2011): for ``x_noisy = x + sigma * eps``, ``eps ~ N(0, I)``, the
minimiser of ``E || s(x_noisy, y) + (x_noisy - x) / sigma**2 ||^2`` is exactly the score of
the noised density. The robust generator (Fang et al., Eqs. 6-7) then moves each image
along ``grad_delta || s(x + delta, y) ||`` so that each class collapses.

Units: images are pixels in ``[0, 1]`` and every sigma is in those pixel units (``0.1``
is 25.5/255, about three times an 8/255 noise budget). The score is in 1 / pixel units.

Parametrisation: the network ``n = ScoreNet(x_noisy, y[, level])`` predicts ``sigma * s``
(equivalently ``-eps``), and :meth:`ScoreEstimator.score` returns ``n / sigma``. With the
per-level weight ``sigma**2`` (Song & Ermon's choice that balances the levels) the loss of
one sample is ``0.5 * sigma**2 * || s + eps / sigma ||^2 = 0.5 * || n + eps ||^2``, computed
in that form: no ``1 / sigma`` factors, and every level has the same O(1) targets. With one
sigma this is Eq. 5 multiplied by the constant ``sigma**2`` (same minimiser).
"""

from __future__ import annotations

import copy
import inspect
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor

from ue_lightning.models.score_net import ScoreNet
from ue_lightning.models.checkpoint import (CheckpointError, build_checked, check_data_facts,
                                             read_lightning_checkpoint)
from ue_lightning.models.frozen_score import geometric_sigmas, training_hint
from ue_lightning.ops.sample_rng import indexed_normal, salt_of

#: salt of the per-sample validation noise (see :func:`indexed_normal`)
_VAL_NOISE_SALT = salt_of(0x5C0E)


def dsm_loss_per_sample(scaled_score: Tensor, eps: Tensor) -> Tensor:
    """sigma^2-weighted DSM loss ``0.5 * ||sigma * s + eps||^2`` per sample, summed over pixels: (B,)."""
    return 0.5 * (scaled_score + eps).flatten(1).pow(2).sum(1)


#: the error of a score checkpoint that is unreadable, of another module or made for other data (a
#: ``ValueError``); a missing one raises its subclass ``CheckpointNotFoundError``, also a ``FileNotFoundError``
ScoreCheckpointError = CheckpointError


class ScoreEstimator(L.LightningModule):
    """Class-conditional score network trained by denoising score matching.

    Args:
        num_classes: number of classes (linked from the DataModule by the CLI).
        in_channels: image channels (linked from the DataModule by the CLI).
        image_size: side of the model's input in pixels (linked from the DataModule by the CLI).
            The checkpoint remembers all three and :meth:`load_for` refuses other data.
        width: base channels of :class:`~ue_lightning.models.ScoreNet` (64 at paper scale,
            8-16 on CPU).
        sigma: the noise level (pixel units of [0, 1] images) when ``num_sigmas == 1``
            (Fang et al.'s Eq. 5 uses a single sigma). Default 0.1 is our choice (the
            paper's value was not available to us): large enough (about 3x the 8/255
            budget) that the score is smooth over the perturbation ball, so
            ``grad_delta ||s(x + delta, y)||`` is informative, and small enough that
            ``p_sigma(x | y)`` keeps the class structure. Ignored when ``num_sigmas > 1``.
        num_sigmas: ``1``: one level ``sigma``. ``L > 1``: NCSN practice, L levels from
            ``sigma_max`` down to ``sigma_min`` (geometric), the network conditioned on
            the level index (0 = ``sigma_max``), each level's loss weighted by sigma^2.
        sigma_min: small end of the geometric list (pixel units; ``< 1``); :meth:`score`
            uses this level, the one whose score is closest to that of the data itself.
        sigma_max: large end of the geometric list (pixel units).
        lr: Adam learning rate.
        ema_decay: keep an exponential moving average of the weights (NCSNv2 uses
            0.999); :meth:`score`, validation and test use the average. None: off.
        noise_seed: seed of the fixed per-sample validation/test noise.

    ``score(x, y)`` is the public entry point; ``forward`` is the same.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        image_size: int = 32,
        width: int = 64,
        sigma: float = 0.1,
        num_sigmas: int = 1,
        sigma_min: float = 0.05,
        sigma_max: float = 1.0,
        lr: float = 2e-4,
        ema_decay: float | None = None,
        noise_seed: int = 0,
    ):
        super().__init__()
        if num_sigmas < 1:
            raise ValueError(f"num_sigmas={num_sigmas} must be >= 1")
        if num_sigmas == 1:
            _check_pixel_sigma(sigma, "sigma")
            sigmas = torch.tensor([float(sigma)])
        else:
            _check_pixel_sigma(sigma_min, "sigma_min")
            if not sigma_max > sigma_min:
                raise ValueError(f"sigma_max={sigma_max} must exceed sigma_min={sigma_min} (pixel units of [0, 1])")
            sigmas = geometric_sigmas(sigma_max, sigma_min, num_sigmas)
        if ema_decay is not None and not 0.0 < ema_decay < 1.0:
            raise ValueError(f"ema_decay={ema_decay} must be in (0, 1), or None for no averaging")
        self.save_hyperparameters()
        self.num_sigmas = num_sigmas
        self.register_buffer("sigmas", sigmas, persistent=False)  # (L,), descending, pixel units
        self.net = ScoreNet(in_channels, num_classes, image_size, width=width, num_sigmas=num_sigmas)
        self.ema_net: ScoreNet | None = None
        if ema_decay is not None:
            self.ema_net = copy.deepcopy(self.net).requires_grad_(False)

    # ------------------------------------------------------------------ the score
    @property
    def score_net(self) -> ScoreNet:
        """The network :meth:`score` uses: the weight average if ``ema_decay`` is set."""
        return self.ema_net if self.ema_net is not None else self.net

    @property
    def sigma_min(self) -> float:
        """The smallest noise level (pixel units), the one :meth:`score` uses."""
        return float(self.sigmas[-1])

    def _scaled_score(self, net: ScoreNet, x: Tensor, y: Tensor, level: Tensor | int) -> Tensor:
        """Network output ``sigma * s`` at noise level index ``level`` (int or (B,) int64)."""
        return net(x, y, level if self.num_sigmas > 1 else None)

    def score(self, x: Tensor, y: Tensor, *, sigma_index: int | None = None) -> Tensor:
        """Estimated score ``grad_x log p_sigma(x | y)`` (B, C, H, W), in 1 / pixel units.

        Args:
            x: (B, C, H, W) float images, pixels in [0, 1] (clean or slightly perturbed).
            y: (B,) int64 labels (or (B, K) soft labels).
            sigma_index: noise level index; None uses the smallest level (``sigma_min``,
                or ``sigma`` with one level).

        Differentiable w.r.t. ``x`` (gradients flow whenever grad mode is on, also when the
        parameters are frozen as by :meth:`load_for`).
        """
        if x.dim() != 4 or x.shape[1] != self.hparams.in_channels:
            raise ValueError(f"expected images (B, {self.hparams.in_channels}, H, W) in [0, 1], got {tuple(x.shape)}")
        level = self.num_sigmas - 1 if sigma_index is None else int(sigma_index)
        if not 0 <= level < self.num_sigmas:
            raise ValueError(f"sigma_index={sigma_index} outside [0, {self.num_sigmas})")
        return self._scaled_score(self.score_net, x, y, level) / self.sigmas[level]

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """Same as :meth:`score` at the smallest noise level."""
        return self.score(x, y)

    # ------------------------------------------------------------------ training
    def dsm_loss(self, net: ScoreNet, x: Tensor, y: Tensor, eps: Tensor, level: Tensor) -> Tensor:
        """Per-sample sigma^2-weighted DSM loss (B,) for noise ``eps`` (B, C, H, W) at levels ``level`` (B,)."""
        sigma = self.sigmas[level].view(-1, 1, 1, 1)
        return dsm_loss_per_sample(self._scaled_score(net, x + sigma * eps, y, level), eps)

    def training_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y, _ = batch
        level = torch.randint(0, self.num_sigmas, (len(y),), device=x.device)
        loss = self.dsm_loss(self.net, x, y, torch.randn_like(x), level).mean()
        self.log("train/dsm_loss", loss, prog_bar=True, batch_size=len(y))
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.ema_net is None:
            return
        step = self.global_step
        decay = min(self.hparams.ema_decay, (1.0 + step) / (10.0 + step))  # short warm-up, as in TF's EMA
        with torch.no_grad():
            for average, live in zip(self.ema_net.parameters(), self.net.parameters()):
                average.lerp_(live, 1.0 - decay)

    def _fixed_noise_loss(self, batch: tuple[Tensor, Tensor, Tensor]) -> tuple[Tensor, int]:
        """Mean DSM loss with noise and levels fixed per sample index (comparable across epochs, batchings, ranks)."""
        x, y, index = batch
        eps = indexed_normal(index, tuple(x.shape[1:]), self.hparams.noise_seed, _VAL_NOISE_SALT).to(x)
        level = (index % self.num_sigmas).to(x.device)
        return self.dsm_loss(self.score_net, x, y, eps, level).mean(), x[0].numel()

    def _log_eval(self, stage: str, batch: tuple[Tensor, Tensor, Tensor]) -> None:
        loss, dims = self._fixed_noise_loss(batch)
        n = len(batch[1])
        self.log(f"{stage}/dsm_loss", loss, prog_bar=stage == "val", sync_dist=True, batch_size=n)
        # 1.0 = the network explains none of the noise (predicts 0); lower is better
        self.log(f"{stage}/dsm_loss_rel", loss / (0.5 * dims), sync_dist=True, batch_size=n)

    def validation_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> None:
        self._log_eval("val", batch)

    def test_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> None:
        self._log_eval("test", batch)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.net.parameters(), lr=self.hparams.lr)

    # ------------------------------------------------------------------ loading
    @classmethod
    def load_for(
        cls,
        checkpoint_path: str | Path,
        *,
        num_classes: int,
        in_channels: int,
        image_size: int,
        map_location: str | torch.device = "cpu",
    ) -> ScoreEstimator:
        """A trained estimator for data with these facts, frozen (eval mode, no parameter grads).

        Reads the checkpoint with ``torch.load(weights_only=True)`` (tensors and plain
        containers only: nothing in the file can run code). Raises
        :class:`ScoreCheckpointError` (a ``ValueError``) when the file is not a readable
        ScoreEstimator checkpoint, or was trained on data with another class count, channel
        count or image size, and its subclass ``CheckpointNotFoundError`` (also a
        ``FileNotFoundError``) when it is missing: the checks and wording of
        :mod:`ue_lightning.models.checkpoint`, shared with TAP's classifier loader.
        """
        name, fix = f"score checkpoint {checkpoint_path}", training_hint(num_classes, in_channels, image_size)
        hparams, state = read_lightning_checkpoint(checkpoint_path, name="score checkpoint", fix=fix, prefix="net.",
                                                   expected="ue_lightning.modules.ScoreEstimator")
        check_data_facts(hparams, {"num_classes": num_classes, "in_channels": in_channels, "image_size": image_size},
                         name=name, fix=fix)
        accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
        model = build_checked(lambda: cls(**{k: v for k, v in hparams.items() if k in accepted}), state, name=name,
                              what="a ScoreEstimator with its own hyper-parameters", fix=fix)
        model.eval().requires_grad_(False)
        return model.to(map_location)


def _check_pixel_sigma(value: float, name: str) -> None:
    if not 0.0 < value < 1.0:
        raise ValueError(f"{name}={value} must be in (0, 1): noise levels are in pixel units of [0, 1] images "
                         f"(0.1 = 25.5/255); a value >= 1 looks like 1/255 units or would drown the images")
