"""The surrogate classifier ``ue protect`` makes noise against: a released checkpoint, or a quick one.

Any checkpoint of the package's modules that hold a classifier as ``self.model`` serves
(an :class:`~ue_lightning.modules.ErrorMinimizingNoise` or
:class:`~ue_lightning.modules.RobustNoiseGenerator` fit, or a victim). The CIFAR forms end
in adaptive average pooling, and the torchvision forms too, so a surrogate trained at
32x32 takes an image of any size.

Without a checkpoint, :func:`train_quick_surrogate` fits a sample-wise EM generator (the
package's own :class:`~ue_lightning.modules.ErrorMinimizingNoise`) on crops of the images
at a fixed working size (default 32x32, at the images' own pixel scale: the noise is made
at full size, so the surrogate should see pixels as they are, not shrunk photos), and
saves it as a checkpoint.
"""

from __future__ import annotations

import logging
import shutil
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torchvision.transforms.v2 import functional as TF

from ue_lightning.models.checkpoint import classifier_from_weights, read_classifier_checkpoint
from ue_lightning.scratch import atomic_write_bytes, scratch_dir

SURROGATES = "ErrorMinimizingNoise or RobustNoiseGenerator (ue fit --config configs/generator/em-*.yaml)"
FIX = ("pass the last.ckpt of a generator fit, or leave --checkpoint out to train a quick surrogate on the "
       "folder itself")


def match_channels(x: Tensor, channels: int) -> Tensor:
    """``x`` (B, 1 or 3, H, W) as a model with ``channels`` inputs sees it, differentiably.

    Grey is repeated to RGB; RGB is averaged to grey. So noise stays in the image's own
    channels whatever the surrogate was trained on.
    """
    if x.shape[1] == channels:
        return x
    if channels == 1:
        return x.mean(dim=1, keepdim=True)
    return x.expand(-1, channels, -1, -1) if x.shape[1] == 1 else x[:, :channels]


@dataclass
class Surrogate:
    """A frozen classifier in eval mode (pixels in [0, 1] -> logits), on ``device``.

    Attributes:
        model: the classifier; its parameters do not require gradients.
        num_classes: its number of logits.
        in_channels: the channels it was trained on (images are matched to them).
        source: where it came from (a checkpoint path).
    """

    model: nn.Module
    num_classes: int
    in_channels: int
    source: str

    def __call__(self, x: Tensor) -> Tensor:
        """Logits (B, num_classes) of images (B, 1 or 3, H, W) in [0, 1]."""
        return self.model(match_channels(x, self.in_channels))

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        """int64 (B,): the predicted class of each image."""
        return self(x).argmax(dim=1)


def load_surrogate(path: str | Path, device: torch.device) -> Surrogate:
    """The frozen surrogate of the checkpoint at ``path`` (read with ``weights_only=True``)."""
    hp, weights = read_classifier_checkpoint(path, name="--checkpoint", expected=SURROGATES, fix=FIX)
    model = classifier_from_weights(hp, weights, name=f"--checkpoint {path}")
    model.eval().requires_grad_(False).to(device)
    return Surrogate(model, int(hp["num_classes"]), int(hp["in_channels"]), str(path))


def working_crops(colour: Tensor, size: int, count: int, generator: torch.Generator) -> Tensor:
    """uint8 (count, 3, size, size): random crops of one image at its own scale (grey repeated to RGB).

    An image with a side shorter than ``size`` is first enlarged so that side is ``size``.
    """
    image = colour.expand(3, -1, -1) if colour.shape[0] == 1 else colour
    if min(image.shape[1:]) < size:
        image = TF.resize(image, [size], antialias=True)
    h, w = image.shape[1:]
    tops = torch.randint(0, h - size + 1, (count,), generator=generator).tolist()
    lefts = torch.randint(0, w - size + 1, (count,), generator=generator).tolist()
    return torch.stack([image[:, t:t + size, left:left + size] for t, left in zip(tops, lefts)])


def cluster_labels(thumbnails: Tensor, seed: int, max_classes: int = 10) -> np.ndarray:
    """int64 (N,): k-means clusters (k = min(max_classes, N)) of uint8 thumbnails (N, 3, s, s), the labels a
    flat set trains its quick surrogate with (it has no others)."""
    from sklearn.cluster import KMeans

    k = min(max_classes, len(thumbnails))
    features = thumbnails.flatten(1).float().numpy() / 255.0
    return KMeans(n_clusters=k, n_init=4, random_state=seed).fit_predict(features).astype(np.int64)


def train_quick_surrogate(crops: Tensor, labels: Sequence[int], checkpoint: Path, *, epsilon: float, seed: int,
                          width: int = 16, max_rounds: int = 10, accelerator: str = "auto") -> Path:
    """Fit sample-wise EM on ``crops`` and save it to ``checkpoint`` (atomically); return the path.

    Args:
        crops: uint8 (N, 3, s, s) working crops, 0-255.
        labels: the class of each crop (N,), 0 .. K-1 with K >= 2.
        checkpoint: where the Lightning checkpoint goes.
        epsilon: the budget in 1/255 units (the step is a tenth of it, as EM's).
        seed: seed of the surrogate and its data order.
        width: the ResNet-18's first-stage width (16: a quarter of the standard 64).
        max_rounds: at most this many EM rounds (10 surrogate steps and one 10-step noise pass each).
        accelerator: Lightning's accelerator (``auto``: a GPU if there is one).
    """
    import lightning as L

    from ue_lightning.data import UEDataModule
    from ue_lightning.modules import ErrorMinimizingNoise

    labels = np.asarray(labels, dtype=np.int64)
    if len(np.unique(labels)) < 2:
        raise ValueError("a quick surrogate needs images of at least two classes (or two images in a flat folder): "
                         "add images, or pass --checkpoint")
    size = crops.shape[-1]
    work = scratch_dir(checkpoint, ".train")
    try:
        data = work / "crops.npz"
        nhwc = crops.permute(0, 2, 3, 1).numpy()
        np.savez(data, x_train=nhwc, y_train=labels, x_test=nhwc[:1], y_test=labels[:1])
        dm = UEDataModule("npz", root=str(data), batch_size=min(64, len(crops)), augment=False, seed=seed)
        em = ErrorMinimizingNoise(num_classes=int(labels.max()) + 1, in_channels=3, image_size=size, width=width,
                                  mode="samplewise", epsilon=epsilon, step_size=epsilon / 10, steps=10,
                                  train_steps=10, max_rounds=max_rounds, eot_padding=size // 8, seed=seed)
        with _quiet_lightning():
            trainer = L.Trainer(max_epochs=-1, accelerator=accelerator, devices=1, logger=False,
                                enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                                default_root_dir=str(work), inference_mode=False)
            trainer.fit(em, datamodule=dm)
            trainer.save_checkpoint(work / "surrogate.ckpt")
        atomic_write_bytes(checkpoint, (work / "surrogate.ckpt").read_bytes())
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return checkpoint


@contextmanager
def _quiet_lightning() -> Iterator[None]:
    """Lightning's INFO lines (devices, stop reasons) and its small-data warnings, silenced for a run."""
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            for noise in ("does not have many workers", "is smaller than the logging", "no `validation_step`",
                          "LeafSpec"):
                warnings.filterwarnings("ignore", message=f".*{noise}")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
