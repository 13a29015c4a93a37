"""The quick surrogate ``ue protect`` trains on the folder itself when no ``--checkpoint`` is given.

The package's own :class:`~ue_lightning.modules.ErrorMinimizingNoise`, fitted on at most
``MAX_IMAGES`` of the images (class-stratified, seeded), ResNet-18 at width 16, saved as a
Lightning checkpoint that :mod:`.surrogate` reads like any other:

* ``samplewise`` (``--method em``): trained on ``CROPS_PER_IMAGE`` random 32x32 crops of
  each image at its own pixel scale, since the noise is then made by PGD at full size: the
  surrogate should see pixels as they are, not shrunk photos;
* ``classwise`` (``--method em-classwise``): trained on each whole image squeezed to 32x32,
  since its class patterns are then stretched over whole images: a victim that shrinks the
  image to its input size sees about the pattern the surrogate learned.

Labels are the class folders; a flat folder (sample-wise only) uses k-means clusters of
16x16 thumbnails, having no others.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Literal

import lightning as L
import numpy as np
import torch
from torch import Tensor
from torchvision.transforms.v2 import functional as TF
from tqdm import tqdm

from ue_lightning.console import quiet_lightning
from ue_lightning.data.datamodule import UEDataModule, stratified_subset
from ue_lightning.modules.em import ErrorMinimizingNoise
from ue_lightning.modules.robust import RobustNoiseGenerator
from ue_lightning.modules.score import ScoreEstimator
from ue_lightning.protect.images import ImageJob, UnreadableImage, read_photo
from ue_lightning.protect.surrogate import robust_step_size
from ue_lightning.scratch import atomic_write_bytes, scratch_dir

WORKING_SIZE = 32  # side of the training images, pixels
CROPS_PER_IMAGE = 4
MAX_IMAGES = 512  # images the quick surrogate trains on at most (its cost is bounded, not the folder's)
WIDTH = 16  # first-stage width of its ResNet-18 (the standard one is 64)
MAX_ROUNDS = 10  # EM rounds at most (each: 10 SGD steps, then one noise pass)


def working_crops(colour: Tensor, size: int, count: int, generator: torch.Generator) -> Tensor:
    """uint8 (count, 3, size, size): random crops of one image (C, H, W) at its own scale, grey repeated to RGB.

    An image with a side shorter than ``size`` is first enlarged so that side is ``size``.
    """
    image = colour.expand(3, -1, -1)
    if min(image.shape[1:]) < size:
        image = TF.resize(image, [size], antialias=True)
    h, w = image.shape[1:]
    tops = torch.randint(0, h - size + 1, (count,), generator=generator).tolist()
    lefts = torch.randint(0, w - size + 1, (count,), generator=generator).tolist()
    return torch.stack([image[:, t:t + size, left:left + size] for t, left in zip(tops, lefts)])


def squeezed(colour: Tensor, size: int) -> Tensor:
    """uint8 (3, size, size): the whole image (C, H, W) resized to a square (aspect not kept), grey repeated."""
    return TF.resize(colour.expand(3, -1, -1), [size, size], antialias=True)


def cluster_labels(thumbnails: Tensor, seed: int, max_classes: int = 10) -> np.ndarray:
    """int64 (N,): k-means clusters (k = min(max_classes, N)) of uint8 thumbnails (N, 3, s, s)."""
    from sklearn.cluster import KMeans

    k = min(max_classes, len(thumbnails))
    features = thumbnails.flatten(1).float().numpy() / 255.0
    return KMeans(n_clusters=k, n_init=4, random_state=seed).fit_predict(features).astype(np.int64)


def training_images(jobs: list[ImageJob], classes: list[str], mode: Literal["samplewise", "classwise"],
                    seed: int) -> tuple[Tensor, np.ndarray]:
    """``(uint8 (N, 3, 32, 32), int64 labels (N,))``: what the quick surrogate trains on (see the module doc)."""
    labels = torch.tensor([classes.index(j.class_name) if classes else 0 for j in jobs], dtype=torch.int64)
    if len(jobs) > MAX_IMAGES:
        jobs = [jobs[i] for i in stratified_subset(labels, MAX_IMAGES, seed).tolist()]
    generator = torch.Generator().manual_seed(seed)
    images, image_labels, thumbnails = [], [], []
    for job in tqdm(jobs, desc="reading", unit="img", file=sys.stderr):
        try:
            colour = read_photo(job.source).colour
        except UnreadableImage:
            continue  # reported by the main pass
        if mode == "samplewise":
            images.append(working_crops(colour, WORKING_SIZE, CROPS_PER_IMAGE, generator))
        else:
            images.append(squeezed(colour, WORKING_SIZE).unsqueeze(0))
        image_labels.append(classes.index(job.class_name) if classes else -1)
        thumbnails.append(squeezed(colour, 16))
    if not images:
        raise ValueError("no readable image to train a quick surrogate on: see the files named above")
    per_image = np.asarray(image_labels) if classes else cluster_labels(torch.stack(thumbnails), seed)
    return torch.cat(images), np.repeat(per_image, len(images[0]))


def fit_and_save(generator: L.LightningModule, images: Tensor, labels: np.ndarray, checkpoint: Path, *,
                 batch_size: int, seed: int, accelerator: str, max_steps: int = -1) -> Path:
    """Fit ``generator`` on ``images`` (uint8 (N, 3, s, s)) with ``labels``, unaugmented, in batches of
    ``batch_size``, until it stops (or ``max_steps``); save its checkpoint to ``checkpoint``, atomically."""
    if len(np.unique(labels)) < 2:
        raise ValueError("a quick surrogate needs images of at least two classes (or two images in a flat folder): "
                         "add images, or pass --checkpoint")
    work = scratch_dir(checkpoint, ".train")
    try:
        data = work / "images.npz"
        nhwc = images.permute(0, 2, 3, 1).numpy()
        np.savez(data, x_train=nhwc, y_train=labels, x_test=nhwc[:1], y_test=labels[:1])
        dm = UEDataModule("npz", root=str(data), batch_size=min(batch_size, len(images)), augment=False, seed=seed)
        with quiet_lightning():
            trainer = L.Trainer(max_epochs=-1, max_steps=max_steps, accelerator=accelerator, devices=1, logger=False,
                                enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                                default_root_dir=str(work), inference_mode=False)
            trainer.fit(generator, datamodule=dm)
            trainer.save_checkpoint(work / "surrogate.ckpt")
        atomic_write_bytes(checkpoint, (work / "surrogate.ckpt").read_bytes())
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return checkpoint


def train_quick_surrogate(images: Tensor, labels: np.ndarray, checkpoint: Path, *,
                          mode: Literal["samplewise", "classwise"], epsilon: float, seed: int,
                          accelerator: str = "auto") -> Path:
    """Fit EM on ``images`` (uint8 (N, 3, s, s)) with ``labels`` and save it to ``checkpoint``, atomically.

    ``epsilon`` in 1/255 units; steps of a tenth of it (EM's ratio): 10 a noise pass, from the
    stored noise (sample-wise) or from the class noise, whose new value is its samples' mean
    over the whole set (class-wise). The pass descends the logit margin: a surrogate learns a
    small folder's clean images in one round, and cross-entropy's gradient is then exactly
    zero for them in float32 (no noise at all for whole classes).
    """
    size = images.shape[-1]
    em = ErrorMinimizingNoise(num_classes=int(labels.max()) + 1, in_channels=3, image_size=size, width=WIDTH,
                              mode=mode, epsilon=epsilon, step_size=epsilon / 10, steps=10, train_steps=10,
                              max_rounds=MAX_ROUNDS, eot_padding=size // 8, classwise_subset=1.0,
                              noise_loss="logit_margin", seed=seed)
    return fit_and_save(em, images, labels, checkpoint, batch_size=64, seed=seed, accelerator=accelerator)


#: The quick REM generator's budget (REM's CIFAR-10 run: 10 noise steps x 5 EOT draws x 10 adversary steps, 5000
#: SGD steps of 128): 4 noise steps of epsilon / 2 (:func:`robust_step_size`), one EOT draw, a one-step adversary
#: (random start, a step of its radius), 300 SGD steps of 32 (about 5 passes over the crops), the rate x0.1 after
#: 200; 10 passes a step. Ours, chosen on the surrogate's train-mode accuracy and on held-out train photos
#: (benchmarks/robust_budget.py); its time and protection: benchmarks/RESULTS.md ("Data owners").
QUICK_ROBUST = dict(steps=4, eot_samples=1, adv_steps=1, batch_size=32, max_steps=300, lr_decay_steps=200)


def train_quick_robust(images: Tensor, labels: np.ndarray, checkpoint: Path, *, epsilon: float, seed: int,
                       accelerator: str = "auto", score_checkpoint: Path | None = None) -> Path:
    """Fit REM (min-min-max: :class:`~ue_lightning.modules.RobustNoiseGenerator`) on ``images`` (uint8 (N, 3, s, s))
    at the :data:`QUICK_ROBUST` budget, adversary at half of ``epsilon`` (1/255 units; REM's rho_a 4 against rho_u
    8), and save it to ``checkpoint``, atomically. With ``score_checkpoint`` (a ScoreEstimator of the same images):
    data collapse, the noise step also descending the score's norm (alpha_s = alpha_u)."""
    q = QUICK_ROBUST
    rem = RobustNoiseGenerator(num_classes=int(labels.max()) + 1, in_channels=3, image_size=images.shape[-1],
                               width=WIDTH, epsilon=epsilon, step_size=robust_step_size(epsilon, q["steps"]),
                               steps=q["steps"],
                               adv_radius=epsilon / 2, adv_step_size=max(epsilon / 2, 0.25), adv_steps=q["adv_steps"],
                               eot_samples=q["eot_samples"], lr_decay_steps=q["lr_decay_steps"], seed=seed,
                               score_checkpoint=None if score_checkpoint is None else str(score_checkpoint))
    return fit_and_save(rem, images, labels, checkpoint, batch_size=q["batch_size"], seed=seed,
                        accelerator=accelerator, max_steps=q["max_steps"])


#: The quick score estimator's budget (the CPU config configs/score/cifar10-npz-cpu/dsm.yaml: ScoreNet width 16,
#: one sigma of 0.1, Adam 1e-3, 320 steps of 128 on 5000 images): 160 steps of 128 (10 passes over 2048 crops).
#: Ours: the paper gives no score-model budget (../shared/papers/001_7979b3883c294936.txt, Sec. 3.2).
QUICK_SCORE = dict(width=16, sigma=0.1, lr=1e-3, batch_size=128, max_steps=160)


def train_quick_score(images: Tensor, labels: np.ndarray, checkpoint: Path, *, seed: int,
                      accelerator: str = "auto") -> Path:
    """Fit a class-conditional :class:`~ue_lightning.modules.ScoreEstimator` (denoising score matching) on
    ``images`` (uint8 (N, 3, s, s)) with ``labels`` at the :data:`QUICK_SCORE` budget; save it to ``checkpoint``."""
    q = QUICK_SCORE
    torch.manual_seed(seed)  # the network's initial weights and the training noise
    score = ScoreEstimator(num_classes=int(labels.max()) + 1, in_channels=3, image_size=images.shape[-1],
                           width=q["width"], sigma=q["sigma"], lr=q["lr"], ema_decay=None, noise_seed=seed)
    return fit_and_save(score, images, labels, checkpoint, batch_size=q["batch_size"], seed=seed,
                        accelerator=accelerator, max_steps=q["max_steps"])


def fit_quick_surrogate(jobs: list[ImageJob], classes: list[str], checkpoint: Path, *,
                        mode: Literal["samplewise", "classwise", "robust", "collapse"], epsilon: float, seed: int,
                        device: torch.device, score_checkpoint: Path | None = None) -> Path:
    """Read the training images of ``jobs``, fit the quick surrogate, save it to ``checkpoint``. ``collapse``: first
    a quick score estimator, saved to ``score_checkpoint`` (kept if it is there), then the generator using it."""
    images, labels = training_images(jobs, classes, "classwise" if mode == "classwise" else "samplewise", seed)
    accelerator = "cpu" if device.type == "cpu" else "auto"
    what = f"{len(images)} images of {WORKING_SIZE}x{WORKING_SIZE} ({len(np.unique(labels))} classes)"
    if mode == "collapse":
        if score_checkpoint is None:
            raise ValueError("a quick collapse generator needs a path for its score estimator")
        if not score_checkpoint.is_file():
            print(f"training a quick score estimator on {what} ...", file=sys.stderr, flush=True)
            train_quick_score(images, labels, score_checkpoint, seed=seed, accelerator=accelerator)
    print(f"training a quick {mode} surrogate on {what} ...", file=sys.stderr, flush=True)
    if mode in ("robust", "collapse"):
        return train_quick_robust(images, labels, checkpoint, epsilon=epsilon, seed=seed, accelerator=accelerator,
                                  score_checkpoint=score_checkpoint if mode == "collapse" else None)
    return train_quick_surrogate(images, labels, checkpoint, mode=mode, epsilon=epsilon, seed=seed,
                                 accelerator=accelerator)
