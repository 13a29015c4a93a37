"""Uniform random noise: the baseline that shows a bounded perturbation alone protects nothing."""

from __future__ import annotations

from torch import Tensor

from ue_lightning.ops.attacks import project_linf
from ue_lightning.modules.generator_base import NoiseGenerator
from ue_lightning.ops.sample_rng import indexed_uniform


class RandomNoise(NoiseGenerator):
    """i.i.d. per-pixel noise, uniform in [-epsilon, epsilon] (method ``random``).

    Each sample's noise is a pure function of (seed, sample index), so the file does not
    depend on batching or DDP rank. With ``sign=True`` every pixel is +-epsilon instead
    (the largest noise of the budget).

    Args:
        num_classes: number of classes (linked from the DataModule by the CLI).
        in_channels: image channels (linked from the DataModule by the CLI).
        image_size: side of the model's input in pixels (linked from the DataModule by the CLI).
            (Unused: the noise takes the shape of the stored images.)
        epsilon: L-infinity budget in 1/255 units.
        sign: draw +-epsilon per pixel instead of uniform values.
        seed: noise seed.
    """

    method = "random"

    def __init__(self, num_classes: int = 10, in_channels: int = 3, image_size: int = 32, epsilon: float = 8.0,
                 sign: bool = False, seed: int = 0):
        super().__init__(epsilon=epsilon, seed=seed)
        self.save_hyperparameters()

    def generate(self, x: Tensor, y: Tensor, index: Tensor) -> Tensor:
        """delta (B, C, H, W) in pixel units, |delta| <= radius, x + delta in [0, 1]."""
        u = indexed_uniform(index, tuple(x.shape[1:]), self.seed).to(x)
        unit = (u >= 0.5).to(x) * 2.0 - 1.0 if self.hparams.sign else 2.0 * u - 1.0
        return project_linf(unit * self.radius_px, x, self.radius_px)
