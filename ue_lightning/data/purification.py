"""Score-model purification: a data thief denoises the train images once, before training on them.

Each image is drowned in Gaussian noise at the score model's level ``sigma`` and brought back
in one step by Tweedie's formula, the posterior mean of the image given its noisy copy under
the model's (class-conditional) noised density:

    x_t = x + sigma * eps,    x_hat = x_t + sigma^2 * s(x_t, y),    eps ~ N(0, I)

(the score ``s = grad log p_sigma(x_t | y)`` of :class:`~ue_lightning.modules.ScoreEstimator`).
The score is the class-conditional model's averaged over every class (:func:`label_blind`) unless
the caller asks for the image's own label: a denoiser told each image's label pulls it towards
its class's typical look, which writes a faint class signal into the image, a shortcut of its
own for a victim that amplifies faint patterns (measured with the fast victim, whose fitted
whitening does: ``benchmarks/RESULTS.md``, "Purification with a score model"). Averaged, the same
operation is applied to every image whatever its label, as with DiffPure's unconditional model.
A perturbation of a few /255 is small against ``sigma`` (0.1 = 25.5/255 in the shipped
configs), so the denoised image carries the statistics the score model learned, not the
perturbation's. This is the one-level form of diffusion purification (DiffPure, Nie et al.,
ICML 2022; against unlearnable examples AVATAR, Dolatabadi et al., 2023, which runs many
reverse steps of a full diffusion model): the package's score model has one noise level, or
a few, and this uses its smallest. ``steps`` > 1 repeats the noise-and-denoise round that many
times at that level (fresh noise each round), each round taking the last one's float image:
several reverse steps at one level, **ours**, a cheap stand-in for a many-level reverse
process (it removes more of what the model does not expect, and more of the image's detail).
The purified image is rounded to uint8, as a thief would save it, and the defence steps and
crop/flip act on it as on any stored image.

Units: images are uint8 0-255 on the way in and out, [0, 1] floats inside; ``sigma`` is in
pixel units of [0, 1] images. The noise of sample ``i`` depends on (seed, i) only, not on the
batch it falls in or the DDP rank that purifies it.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor
from torch.utils.data import Dataset

from ue_lightning.ops.sample_rng import indexed_normal, salt_of

#: salt of the purification noise (see :func:`~ue_lightning.ops.sample_rng.indexed_normal`)
PURIFY_SALT = salt_of("purify")

#: ``score(x, y) -> grad_x log p_sigma(x | y)``: images (B, C, H, W) in [0, 1] and int64 labels (B,) to
#: the score (B, C, H, W) in 1 / pixel units
ScoreFn = Callable[[Tensor, Tensor], Tensor]


def label_blind(score: ScoreFn, num_classes: int) -> ScoreFn:
    """The class-conditional ``score`` averaged over all ``num_classes`` labels: the same for every label given.

    Not the score of the marginal density (that weighs the classes by ``p(y | x_t)``), but a
    denoiser that cannot tell one class from another. Costs ``num_classes`` score passes.
    """

    def averaged(x: Tensor, y: Tensor) -> Tensor:
        total = torch.zeros_like(x)
        for k in range(num_classes):
            total += score(x, torch.full_like(y, k))
        return total / num_classes

    return averaged


def round_salt(round_: int) -> int:
    """The salt of purification round ``round_`` (0: :data:`PURIFY_SALT`, so one round is the one-step form)."""
    return PURIFY_SALT if round_ == 0 else salt_of("purify", round_)


def tweedie_denoise(images: Tensor, labels: Tensor, indices: Tensor, score: ScoreFn, sigma: float, *,
                    seed: int, steps: int = 1) -> Tensor:
    """Noise each image at ``sigma`` and denoise it in one step (Tweedie), ``steps`` times; uint8 (B, C, H, W) in,
    uint8 out.

    Args:
        images: uint8 (B, C, H, W), 0-255.
        labels: int64 (B,), the images' classes (the thief's labels).
        indices: int64 (B,), each image's index in its split: its noise depends on (seed, index) only.
        score: the score of the data smoothed at ``sigma`` (``ScoreEstimator.score``).
        sigma: the score's noise level, pixel units of [0, 1] images.
        seed: seed of the noise.
        steps: rounds of noise and denoising (each round's noise from (seed, index, round)), at least 1.
    """
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError(f"expected uint8 images (B, C, H, W), got {images.dtype} {tuple(images.shape)}")
    if steps < 1:
        raise ValueError(f"purify_steps={steps} must be at least 1")
    x = images.float() / 255
    for round_ in range(steps):
        eps = indexed_normal(indices.cpu(), tuple(x.shape[1:]), seed, round_salt(round_)).to(x.device)
        noisy = x + sigma * eps
        with torch.no_grad():
            x = (noisy + sigma ** 2 * score(noisy, labels.to(x.device))).clamp(0, 1)
    return (x * 255).round().to(torch.uint8)


class PurifiedImages(Dataset):
    """Purified copies of some of ``published``'s images, held in memory, read as ``(image, label)``.

    ``published[i]`` is ``(uint8 image (C, H, W), label, ...)`` as the thief reads it (protected
    or not: a :class:`~ue_lightning.data.datamodule.ProtectedImages` with no transform); each
    ``i`` in ``indices`` is purified with ``score`` by :func:`tweedie_denoise` (``steps`` rounds), in batches of
    ``batch_size`` on ``device``. Only the listed indices can be read.
    """

    def __init__(self, published: Dataset, indices: Tensor, score: ScoreFn, sigma: float, *, seed: int,
                 batch_size: int = 256, device: torch.device | str = "cpu", steps: int = 1):
        self.size = len(published)
        self.position = torch.full((self.size,), -1, dtype=torch.int64)
        self.position[indices] = torch.arange(len(indices))
        chunks, labels = [], []
        for start in range(0, len(indices), batch_size):
            batch = indices[start:start + batch_size]
            samples = [published[int(i)] for i in batch]
            batch_labels = torch.tensor([sample[1] for sample in samples], dtype=torch.int64)
            images = torch.stack([sample[0] for sample in samples]).to(device)
            chunks.append(tweedie_denoise(images, batch_labels, batch, score, sigma, seed=seed, steps=steps).cpu())
            labels.append(batch_labels)
        self.images = torch.cat(chunks) if chunks else torch.empty(0, dtype=torch.uint8)
        self.labels = torch.cat(labels) if labels else torch.empty(0, dtype=torch.int64)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        position = int(self.position[index])
        if position < 0:
            raise IndexError(f"sample {index} was not purified (only the victim's train samples are)")
        return self.images[position], int(self.labels[position])
