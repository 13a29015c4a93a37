"""What every noise generator shares: how `ue predict` turns its noise into a noise file."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import Tensor

from ue_lightning.attacks import budget_to_pixels
from ue_lightning.callbacks import log_perturbation_grid, tensorboard_loggers
from ue_lightning.data.noise_file import quantize_delta


def to_uint8(x: Tensor) -> Tensor:
    """The uint8 image (0-255) behind a float image that the DataModule made from it."""
    return (x * 255.0).round().clamp(0, 255).to(torch.uint8)


def round_to_pixel_grid(x: Tensor) -> Tensor:
    """Images in [0, 1] rounded to the 1/255 grid (what a uint8 protected image stores), in ``x``'s dtype."""
    return to_uint8(x).to(x.dtype) / 255.0


class NoiseGenerator(L.LightningModule):
    """Base class of the noise generators.

    Subclasses implement :meth:`generate` (float delta in pixel units for a clean batch)
    and set ``method`` and ``epsilon``. ``predict_step`` rounds that delta against the
    clean uint8 image, so ``PerturbationWriter`` writes exactly ``protected - clean``.
    Class-wise generators set ``classwise = True`` and implement :meth:`class_delta`.
    """

    method: str = "noise"
    classwise: bool = False

    def __init__(self, epsilon: float = 8.0, seed: int = 0):
        super().__init__()
        self.epsilon = float(epsilon)  # 1/255 units, as in configs and noise files
        self.radius_px = budget_to_pixels(epsilon, "epsilon", allow_zero=False)  # pixel units
        self.seed = int(seed)

    def generate(self, x: Tensor, y: Tensor, index: Tensor) -> Tensor:
        """delta (B, C, H, W) in pixel units, |delta| <= radius, x + delta in [0, 1]."""
        raise NotImplementedError

    def class_delta(self) -> Tensor:
        """Class-wise generators: int8 (K, C, H, W) in 1/255 units."""
        raise NotImplementedError

    def predict_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> dict[str, Tensor]:
        x, y, index = batch
        if self.classwise:
            return {"index": index}
        delta = self.generate(x, y, index)
        return {"index": index.cpu(), "delta": quantize_delta(to_uint8(x), delta, self.epsilon).cpu()}

    def on_predict_batch_end(self, outputs: dict[str, Tensor], batch: tuple[Tensor, Tensor, Tensor], batch_idx: int,
                             dataloader_idx: int = 0) -> None:
        """The first batch's ``clean | noise | protected`` grid goes to TensorBoard, when a TensorBoardLogger is set."""
        if batch_idx != 0 or not self.trainer.is_global_zero or not tensorboard_loggers(self.loggers):
            return
        x, y, _ = batch
        delta = self.class_delta()[y.cpu()] if self.classwise else outputs["delta"]
        log_perturbation_grid(self.loggers, to_uint8(x), delta, self.epsilon, self.global_step)

    def noise_metadata(self) -> dict[str, Any]:
        """Method, budget and config for the noise file (see NoiseMetadata)."""
        config = {k: v for k, v in dict(self.hparams).items() if isinstance(v, (int, float, str, bool, list, tuple, type(None)))}
        return {"method": self.method, "epsilon": self.epsilon, "config": config}
