"""UEDataModule: one DataModule for every step, clean or protected by one argument."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import lightning as L
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision.transforms import v2

from ue_lightning.data.datasets import DATASETS, CleanImages, load_dataset
from ue_lightning.data.noise_file import NoiseFile, NoiseFileError, apply_delta
from ue_lightning.data.defences import DEFENCES, Defence, DefenceName, Views, build_defence
from ue_lightning.models.frozen_score import load_frozen_score
from ue_lightning.data.purification import PurifiedImages, label_blind
from ue_lightning.data.sampling import held_out_split, protected_mask, stratified_subset  # noqa: F401


class ProtectedImages(Dataset):
    """Yields ``(image, label, index)``: float image in [0, 1] (C, H, W) after noise and transform.

    ``index`` is the sample's position in the whole split. Noise (int8, 1/255 units) is
    added to the uint8 image before the transform, as a published protected dataset
    would be read; only samples marked in ``mask`` get it.
    """

    def __init__(self, base: CleanImages, transform: v2.Transform, noise: NoiseFile | None = None,
                 mask: Tensor | None = None):
        self.base, self.transform, self.noise = base, transform, noise
        self.mask = mask if mask is not None else torch.zeros(len(base), dtype=torch.bool)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> tuple[Tensor, int, int]:
        image, label = self.base[index]
        if self.noise is not None and self.mask[index]:
            image = apply_delta(image, self.noise.delta_for([index], [label])[0])
        return self.transform(image), label, index


def _augmentation(dataset: str, image_shape: tuple[int, int, int], crop: int, train: bool,
                  defence: Defence | None = None) -> v2.Transform:
    """Per-dataset transform from the uint8 image to a float image in [0, 1].

    A ``defence``'s ``squeeze`` steps come first (on the uint8 image), its ``augment``
    steps last (on the float image); the batch-level ones are the train loader's.
    """
    to_float = v2.ToDtype(torch.float32, scale=True)
    folder_like = dataset in ("imagenet_subset", "folder")
    if folder_like:
        steps = [v2.RandomResizedCrop(crop, antialias=True), v2.RandomHorizontalFlip()] if train else [v2.CenterCrop(crop)]
    elif not train:
        steps = []
    elif dataset in ("digits", "svhn"):  # digits are not mirror-symmetric: crop (1/8 of the side), no flip
        steps = [v2.RandomCrop(image_shape[1], padding=image_shape[1] // 8)]
    else:
        steps = [v2.RandomCrop(image_shape[1], padding=image_shape[1] // 8), v2.RandomHorizontalFlip()]
    if defence is not None:
        draw = v2.Compose(defence.augment) if defence.augment else v2.Identity()  # UEraser draws on the batch
        augment = [Views(draw, defence.views)] if defence.views > 1 else defence.augment
        return v2.Compose([*defence.squeeze, *steps, to_float, *augment])
    return v2.Compose([*steps, to_float])


class UEDataModule(L.LightningDataModule):
    """Clean or protected train data, clean held-out validation and test data, one DataModule for every step.

    Args:
        dataset: one of ``digits`` (embedded, offline), ``cifar10``, ``cifar100``, ``svhn``,
            ``imagenet_subset``, ``folder``, ``npz``.
        root: data folder (CIFAR, SVHN, image folders) or the ``.npz`` file.
        download: let torchvision download CIFAR or SVHN into ``root``.
        batch_size: train batch size per device.
        eval_batch_size: test/predict batch size per device (None: ``batch_size``).
        num_workers: DataLoader workers.
        train_subset: keep a seeded, class-stratified subset of this many train samples.
        perturbation: a noise file (``.safetensors``) to protect the train data with;
            None trains on clean data.
        protected_fraction: share of the train samples (less the ``val_fraction`` ones) that get noise
            (seeded choice); the rest stay clean.
        drop_protected: train on the clean rest alone: the samples ``protected_fraction`` marks are left
            out instead of noised (the same seeded choice), the baseline partial protection is compared with
            (a thief who trains only on what was not protected). Needs ``protected_fraction`` < 1.
        augment: random training augmentation (crop + flip, per dataset); noise
            generators turn it off, victims keep it on.
        max_classes: keep the first (sorted) class folders of ``imagenet_subset`` (default 100)
            or ``folder`` (default all).
        resize: the square size images are stored at (noise is added here): folder datasets
            (None: 256) and the digits (None: 8; 16 enlarges them by pixel repetition).
        crop: folder datasets: model input size (random-resized crop in training, centre crop in test).
        val_fraction: share (0 to below 1) of the train samples (of ``train_subset`` if set) held out
            from training as validation data: seeded (``seed``), class-stratified, served by
            ``val_dataloader()`` clean and unaugmented (no noise, defence or purification), so ``val/acc``
            is the accuracy on held-out train images. The noise file still covers every train sample;
            ``protected_fraction`` and ``drop_protected`` apply to the rest. 0 (the default): no
            validation at all; the test split is never served for validation.
        seed: seed of ``train_subset``, of the ``val_fraction`` split and of the ``protected_fraction`` choice.
        predict_split: split served by ``predict`` (``train`` to generate noise), clean,
            unaugmented and in order.
        defence: what a data thief does to the train images after reading them (protected
            or not), with its paper's parameters (``ue_lightning.data.defences``): ``jpeg10``,
            ``jpeg50``, ``grayscale``, ``bitdepth``, ``cutout``, ``mixup``, ``cutmix``, ``iss``,
            ``ueraser``, ``ueraser-max`` or ``none``. Never applied to test or predict data. ``mixup`` and
            ``cutmix`` turn train labels into soft targets (B, num_classes); ``ueraser-max`` makes
            train batches of 5 views of each image (B, 5, C, H, W), which the victim trains on.
        purify_with: a :class:`~ue_lightning.modules.ScoreEstimator` checkpoint (``last.ckpt`` of
            ``configs/score/dsm.yaml`` on this data): before training, the thief purifies the train
            images (protected or not) with it, once (``ue_lightning.data.purification``: noise at the
            model's sigma, one denoising step; ``purify_steps`` rounds of it), before ``defence``. None: no
            purification.
        purify_steps: rounds of noise and one-step denoising at the score model's level (1: the one-step
            form; more: several reverse steps at one level, ours).
        purify_labels: ``blind`` (default): the score averaged over every class, the same denoiser for
            every image; ``own``: each image's own label, which writes the label into the image (a
            shortcut of its own; kept to show it).
    """

    def __init__(
        self,
        dataset: str = "digits",
        root: str = "data",
        download: bool = False,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        train_subset: int | None = None,
        val_fraction: float = 0.0,
        perturbation: str | None = None,
        protected_fraction: float = 1.0,
        drop_protected: bool = False,
        augment: bool = True,
        max_classes: int | None = None,
        resize: int | None = None,
        crop: int = 224,
        seed: int = 0,
        predict_split: Literal["train", "test"] = "train",
        defence: DefenceName = "none",
        purify_with: str | None = None,
        purify_labels: Literal["blind", "own"] = "blind",
        purify_steps: int = 1,
    ):
        super().__init__()
        if dataset not in DATASETS:
            raise ValueError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
        if not 0.0 <= protected_fraction <= 1.0:
            raise ValueError(f"protected_fraction={protected_fraction} must be in [0, 1]")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction={val_fraction} must be in [0, 1)")
        if drop_protected and protected_fraction == 1.0:
            raise ValueError("drop_protected leaves out every train sample at protected_fraction=1: set "
                             "data.protected_fraction below 1 (the share left out)")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be positive")
        if purify_labels not in ("blind", "own"):
            raise ValueError(f"purify_labels={purify_labels!r} must be 'blind' or 'own'")
        if purify_steps < 1:
            raise ValueError(f"purify_steps={purify_steps} must be at least 1 (1: one noise-and-denoise round)")
        if defence not in DEFENCES:
            raise ValueError(f"unknown defence {defence!r}; choose one of {', '.join(DEFENCES)}")
        # Logged as data_seed: Lightning merges the module's and the datamodule's hyperparameters for the logger
        # and refuses a key both have with different values (a generator's own `seed`).
        self.save_hyperparameters(ignore=["seed"])
        self.hparams["data_seed"] = seed
        self.dataset, self.root, self.download = dataset, root, download
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.num_workers, self.train_subset, self.perturbation = num_workers, train_subset, perturbation
        self.protected_fraction, self.augment, self.seed = protected_fraction, augment, seed
        self.drop_protected, self.val_fraction = drop_protected, val_fraction
        self.resize, self.crop, self.predict_split = resize, crop, predict_split
        self.max_classes, self.defence = max_classes, defence
        self.purify_with, self.purify_labels, self.purify_steps = purify_with, purify_labels, purify_steps
        self._clean: dict[str, CleanImages] = {}

    # ------------------------------------------------------------------ facts (for links)
    def clean_split(self, split: Literal["train", "test"]) -> CleanImages:
        """The clean split, loaded once (uint8 images, no noise, no transform)."""
        if split not in self._clean:
            self._clean[split] = load_dataset(self.dataset, self.root, split == "train", download=self.download,
                                              num_classes=self.max_classes, resize=self.resize)
        return self._clean[split]

    @property
    def num_classes(self) -> int:
        return self.clean_split("train").num_classes

    @property
    def in_channels(self) -> int:
        return self.clean_split("train").image_shape[0]

    @property
    def image_size(self) -> int:
        """Side of the images the model sees in training (the crop for folder datasets)."""
        return self.crop if self.dataset in ("imagenet_subset", "folder") else self.clean_split("train").image_shape[1]

    @property
    def stored_image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the uint8 images noise is added to."""
        return self.clean_split("train").image_shape

    @property
    def num_train_samples(self) -> int:
        """Size of the whole train split (rows of a sample-wise noise file)."""
        return len(self.clean_split("train"))

    def train_indices(self) -> Tensor:
        """Indices (into the whole split) of the samples used for training."""
        labels = self.clean_split("train").targets
        if self.train_subset is None:
            return torch.arange(len(labels))
        return stratified_subset(labels, self.train_subset, self.seed)

    def _fit_and_val(self) -> tuple[Tensor, Tensor]:
        """``train_indices()`` split into the samples left for training and the held-out ``val_fraction``."""
        indices = self.train_indices()
        held = held_out_split(self.clean_split("train").targets[indices], self.val_fraction, self.seed)
        return indices[~held], indices[held]

    def val_indices(self) -> Tensor:
        """Indices (into the whole split) of the held-out validation samples (empty at ``val_fraction`` 0)."""
        return self._fit_and_val()[1]

    def victim_indices(self) -> Tensor:
        """Indices of the samples a victim trains on: ``train_indices()`` less ``val_indices()``, and less the
        protected share if ``drop_protected``."""
        indices = self._fit_and_val()[0]
        if not self.drop_protected:
            return indices
        return indices[~self._protected(indices)[indices]]

    def _protected(self, candidates: Tensor) -> Tensor:
        """Bool mask over the whole split: the ``protected_fraction`` of ``candidates`` (the samples left for
        training) that get noise (or are left out under ``drop_protected``)."""
        return protected_mask(self.num_train_samples, candidates, self.protected_fraction, self.seed)

    # ------------------------------------------------------------------ datasets
    def setup(self, stage: str | None = None) -> None:
        train = self.clean_split("train")
        shape = train.image_shape
        noise, mask = None, None
        fit, val = self._fit_and_val()
        if self.perturbation is not None:
            noise = NoiseFile.open(self.perturbation)
            noise.check_matches(train.fingerprint())
            noise.check_budget()
            mask = self._protected(fit)
            if noise.covered is not None:
                uncovered = mask.numpy() & (np.asarray(noise.covered) == 0)
                if uncovered.any():
                    raise NoiseFileError(
                        f"{self.perturbation} has no noise for {int(uncovered.sum())} of the samples to protect "
                        f"(e.g. index {int(uncovered.nonzero()[0][0])}): it was generated over another "
                        "train_subset; use the same data.train_subset and data.seed as for generation.")
        self.noise = noise
        victim = self.victim_indices()
        if self.purify_with is not None and stage in (None, "fit"):  # only training reads the train set
            train, noise = self._purified(train, victim, noise, mask), None  # the noise is in the purified images
        self.train_defence = build_defence(self.defence, dataset=self.dataset, image_size=self.image_size,
                                           num_classes=self.num_classes)
        augmentation = _augmentation(self.dataset, shape, self.crop, self.augment, self.train_defence)
        self.train_set = Subset(ProtectedImages(train, augmentation, noise, mask), victim.tolist())
        test = self.clean_split("test")
        evaluation = _augmentation(self.dataset, shape, self.crop, train=False)
        self.test_set = ProtectedImages(test, evaluation)
        # held-out train images, as the test images are served: clean, unaugmented, never defended or purified
        held_out = ProtectedImages(self.clean_split("train"), evaluation)
        self.val_set = Subset(held_out, val.tolist()) if len(val) else None
        if self.val_set is None and self.trainer is not None:
            self.trainer.limit_val_batches = 0  # no validation data: Lightning skips validation without a warning
        if self.predict_split == "train":  # noise generation: clean, unaugmented, full stored size
            self.predict_set = self.train_images()
        else:
            self.predict_set = ProtectedImages(test, v2.ToDtype(torch.float32, scale=True))

    def train_images(self, samples: Literal["all", "victim"] = "all", noised: bool = False,
                     transform: v2.Transform | None = None) -> Subset:
        """The train samples in order and unaugmented, as ``(image, label, index)`` (``index`` into the whole split).

        Args:
            samples: ``all``: every sample of :meth:`train_indices` (what a generator makes noise for, the
                held-out validation samples included); ``victim``: the samples a victim trains on
                (:meth:`victim_indices`).
            noised: the images as the victim's train set holds them (needs ``setup``): with the noise file's
                delta on the samples it protects, purified if ``purify_with``; otherwise clean.
            transform: uint8 image -> float image in [0, 1] (None: to float at the stored size).
        """
        transform = v2.ToDtype(torch.float32, scale=True) if transform is None else transform
        indices = self.train_indices() if samples == "all" else self.victim_indices()
        if not noised:
            return Subset(ProtectedImages(self.clean_split("train"), transform), indices.tolist())
        if getattr(self, "train_set", None) is None:
            raise RuntimeError("train_images(noised=True) reads the train set the DataModule set up: call setup() first")
        served = self.train_set.dataset
        return Subset(ProtectedImages(served.base, transform, served.noise, served.mask), indices.tolist())

    def _purified(self, train: CleanImages, indices: Tensor, noise: NoiseFile | None,
                  mask: Tensor | None) -> PurifiedImages:
        """The victim's train images, protected as published, purified with the ``purify_with`` score model."""
        channels, height, width = train.image_shape
        if height != width or height != self.image_size:
            raise ValueError(f"data.purify_with purifies the stored train images ({height}x{width} here) with a score "
                             f"model of the training input size ({self.image_size}); for a folder dataset set "
                             "data.resize equal to data.crop")
        device = self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")
        model = load_frozen_score(self.purify_with, num_classes=self.num_classes, in_channels=channels,
                                  image_size=height, map_location=device)
        published = ProtectedImages(train, v2.Identity(), noise, mask)  # uint8, as the thief reads them
        score = model.score if self.purify_labels == "own" else label_blind(model.score, self.num_classes)
        return PurifiedImages(published, indices, score, model.sigma_min, seed=self.seed,
                              batch_size=self.eval_batch_size, device=device, steps=self.purify_steps)

    def _loader(self, dataset: Dataset, batch_size: int, shuffle: bool, collate_fn=None) -> DataLoader:
        return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0, pin_memory=torch.cuda.is_available(),
                          collate_fn=collate_fn)

    def train_dataloader(self) -> DataLoader:
        """Shuffled train batches; under ``mixup``/``cutmix`` the labels are soft targets (B, num_classes),
        under ``ueraser-max`` the images views (B, V, C, H, W)."""
        collate, views = self.train_defence.batch, self.train_defence.views
        module = self.trainer.lightning_module if self.trainer is not None else None
        if self.train_defence.mixes_labels and module is not None and not getattr(module, "accepts_soft_targets", False):
            raise ValueError(f"data.defence {self.defence} mixes labels into soft targets, which "
                             f"{type(module).__name__} does not train on; use it with VictimClassifier")
        if views > 1 and module is not None and not getattr(module, "accepts_views", False):
            raise ValueError(f"data.defence {self.defence} serves {views} views of each train image, which "
                             f"{type(module).__name__} does not train on; use it with VictimClassifier")
        return self._loader(self.train_set, self.batch_size, shuffle=True, collate_fn=collate)

    def val_dataloader(self) -> DataLoader | list:
        """The held-out train samples of ``val_fraction``, clean, unaugmented, in order; at ``val_fraction`` 0 an
        empty list (Lightning then skips validation). Never the test split: tuning on it would tune on the test."""
        if self.val_set is None:
            return []
        return self._loader(self.val_set, self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, self.eval_batch_size, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.predict_set, self.eval_batch_size, shuffle=False)

    def describe(self) -> str:
        p = f", protected by {Path(self.perturbation).name} ({self.protected_fraction:.0%})" if self.perturbation else ", clean"
        if self.drop_protected:
            p = f", clean, the {self.protected_fraction:.0%} to protect left out"
        d = f", defence {self.defence}" if self.defence != "none" else ""
        if self.purify_with is not None:
            rounds = f", {self.purify_steps} rounds" if self.purify_steps > 1 else ""
            d = f", purified with {self.purify_with} ({self.purify_labels} labels{rounds})" + d
        v = f", {len(self.val_indices())} held out for validation" if self.val_fraction > 0 else ""
        return f"{self.dataset} ({len(self.victim_indices())} train samples{v}{p}{d})"
