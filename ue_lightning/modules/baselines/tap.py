"""TAP: targeted adversarial poisons (Fowl et al., 2021, "Adversarial examples make strong poisons").

A classifier trained on the *clean* data is frozen; every training image gets the targeted
PGD perturbation that makes the classifier predict another class, ``target_map[y]``
(default ``(y + 1) mod K``, as the reference's ``_label_map``). A victim trained on the
poisons learns the wrong features for each class.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ue_lightning.ops.attacks import box_start, budget_to_pixels, pgd_minimize
from ue_lightning.ops.augment import random_crop_flip
from ue_lightning.models.checkpoint import check_data_facts, read_classifier_checkpoint
from ue_lightning.models.registry import classifier_from_weights
from ue_lightning.modules.generator_base import NoiseGenerator
from ue_lightning.ops.sample_rng import indexed_uniform, salt_of

_MAKE_ONE = ("train one on the clean data first, e.g. `ue fit --config configs/data/cifar10.yaml "
             "--config configs/victim/resnet18.yaml --trainer.callbacks.dirpath runs/victim/clean-cifar10/checkpoints`"
             ", then point classifier_checkpoint at runs/victim/clean-cifar10/checkpoints/last.ckpt "
             "(the header of configs/generator/tap.yaml and of its overlays gives the exact commands)")


def load_victim_classifier(path: str | Path, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    """The classifier (pixels in [0, 1] -> logits) inside a ``VictimClassifier`` checkpoint.

    Refuses, with a message naming the fix, a missing or unreadable file, a checkpoint of
    another module, and one trained for another class count, channel count or image size.
    The checkpoint is read with ``weights_only=True`` (no code runs while loading).
    """
    hp, weights = read_classifier_checkpoint(path, name="classifier_checkpoint",
                                             expected="ue_lightning.modules.VictimClassifier", fix=_MAKE_ONE)
    check_data_facts(hp, {"num_classes": num_classes, "in_channels": in_channels, "image_size": image_size},
                     name=f"classifier_checkpoint {path}",
                     fix=f"train the clean classifier on this dataset; {_MAKE_ONE}")
    return classifier_from_weights(hp, weights, name=f"classifier_checkpoint {path}")


def target_map(num_classes: int, shift: int = 1, permutation: Sequence[int] | None = None) -> Tensor:
    """int64 (K,): the class each class is pushed towards.

    ``permutation`` (a permutation of ``range(K)`` without fixed points) wins over
    ``shift``; otherwise ``(k + shift) mod K`` (the reference uses shift 1).
    """
    if permutation is not None:
        perm = [int(p) for p in permutation]
        if sorted(perm) != list(range(num_classes)):
            raise ValueError(f"target_permutation must be a permutation of 0..{num_classes - 1}, got {perm}")
        mapping = torch.tensor(perm, dtype=torch.int64)
    else:
        if shift % num_classes == 0:
            raise ValueError(f"target_shift={shift} maps every class to itself (num_classes={num_classes}); "
                             "use a shift that is not a multiple of num_classes, e.g. 1")
        mapping = (torch.arange(num_classes) + shift) % num_classes
    fixed = (mapping == torch.arange(num_classes)).nonzero().flatten().tolist()
    if fixed:
        raise ValueError(f"the target map sends classes {fixed} to themselves: a targeted poison needs another "
                         "class; fix target_permutation")
    return mapping


class TargetedAdversarialPoison(NoiseGenerator):
    """Targeted PGD poisons against a frozen, clean-trained classifier (method ``tap``).

    Each sample minimises ``CE(f(aug(x + delta)), target_map[y])`` by sign-gradient descent
    within the L-infinity ball of radius ``epsilon``; every step draws a new differentiable
    random crop + flip per sample (expectation over transformations, as the reference's
    ``--paugment``), from the sample's index, so the noise does not depend on batching or
    DDP rank. Nothing is trained: ``ue predict`` runs without ``--ckpt_path``.

    Reference defaults (lhfowl/adversarial_poisons, ``village/options.py`` and
    ``forgemaster_base.py``): eps 8/255, 250 PGD iterations of ``tau * eps = 0.05 * 8 = 0.4``/255,
    8 restarts keeping the lowest target loss, random translation of about +-4 px plus a
    flip. Differences here: the start is uniform in the box (the reference draws
    ``randn * eps`` clipped), restarts default to 1 (each costs a full attack) and, when
    used, the best restart is chosen *per sample* by its un-augmented target loss (the
    reference keeps one whole trial). REM's reimplementation uses 250 steps of 0.064/255.

    Args:
        classifier_checkpoint: a ``VictimClassifier`` checkpoint trained on the clean data
            (``ue fit --config configs/data/<d>.yaml --config configs/victim/<arch>.yaml``).
        num_classes: number of classes (linked from the DataModule by the CLI).
        in_channels: image channels (linked from the DataModule by the CLI).
        image_size: side of the model's input in pixels (linked from the DataModule by the CLI).
            All three must match the classifier checkpoint.
        epsilon: L-infinity budget in 1/255 units.
        step_size: PGD step in 1/255 units (reference 0.4).
        steps: PGD steps (reference 250).
        restarts: independent random starts; the per-sample lowest target loss wins.
        target_shift: target class ``(y + target_shift) mod K``.
        target_permutation: explicit target class of each class (overrides ``target_shift``).
        augment: differentiable random crop + flip inside the loss.
        padding: crop padding in pixels (None: stored image side // 8, i.e. 4 on 32 px).
        flip: random horizontal flips (turn off for digits: they are not mirror-symmetric).
        seed: seed of the random starts and augmentations.
    """

    method = "tap"

    def __init__(
        self,
        classifier_checkpoint: str,
        num_classes: int = 10,
        in_channels: int = 3,
        image_size: int = 32,
        epsilon: float = 8.0,
        step_size: float = 0.4,
        steps: int = 250,
        restarts: int = 1,
        target_shift: int = 1,
        target_permutation: list[int] | None = None,
        augment: bool = True,
        padding: int | None = None,
        flip: bool = True,
        seed: int = 0,
    ):
        super().__init__(epsilon=epsilon, seed=seed)
        self.save_hyperparameters()
        if steps < 1 or restarts < 1:
            raise ValueError(f"steps={steps} and restarts={restarts} must be at least 1")
        if padding is not None and padding < 0:
            raise ValueError(f"padding={padding} must be >= 0 (pixels)")
        self.step_size_px = budget_to_pixels(step_size, "step_size", allow_zero=False)
        self.classifier = load_victim_classifier(classifier_checkpoint, num_classes, in_channels, image_size)
        self.classifier.eval().requires_grad_(False)
        self.register_buffer("target_of_class", target_map(num_classes, target_shift, target_permutation),
                             persistent=False)

    def train(self, mode: bool = True) -> "TargetedAdversarialPoison":
        """The classifier stays in eval mode (BatchNorm running statistics) whatever Lightning asks."""
        super().train(mode)
        self.classifier.eval()
        return self

    def targets(self, y: Tensor) -> Tensor:
        """Target class (B,) of labels ``y`` (B,)."""
        if int(y.max()) >= len(self.target_of_class) or int(y.min()) < 0:
            raise ValueError(f"labels must be in 0..{len(self.target_of_class) - 1}, got {y.min()}..{y.max()}")
        return self.target_of_class[y]

    def _loss(self, target: Tensor, index: Tensor, restart: int, padding: int) -> Callable[[Tensor], Tensor]:
        """Summed target CE; each call (one PGD step) draws the next per-sample augmentation."""
        calls = itertools.count()

        def loss_fn(x_adv: Tensor) -> Tensor:
            step = next(calls)
            if self.hparams.augment:
                x_adv = random_crop_flip(x_adv, padding, self.hparams.flip, index=index, seed=self.seed,
                                         salt=salt_of(1_000_003 * (restart + 1) + step))
            return F.cross_entropy(self.classifier(x_adv), target, reduction="sum")

        return loss_fn

    def generate(self, x: Tensor, y: Tensor, index: Tensor) -> Tensor:
        """delta (B, C, H, W) in pixel units, |delta| <= radius, x + delta in [0, 1]."""
        self.classifier.eval()
        target = self.targets(y)
        padding = self.hparams.padding if self.hparams.padding is not None else max(1, x.shape[-1] // 8)
        best, best_loss = None, None
        for restart in range(self.hparams.restarts):
            u = indexed_uniform(index, tuple(x.shape[1:]), self.seed, salt=salt_of(2 * restart))
            start = box_start(u, x, self.radius_px)
            delta = pgd_minimize(self._loss(target, index, restart, padding), x, radius=self.radius_px,
                                 step_size=self.step_size_px, steps=self.hparams.steps, init=start)
            if self.hparams.restarts == 1:
                return delta
            with torch.no_grad():
                loss = F.cross_entropy(self.classifier(x + delta), target, reduction="none")
            if best is None:
                best, best_loss = delta, loss
            else:
                better = loss < best_loss
                best = torch.where(better[:, None, None, None], delta, best)
                best_loss = torch.minimum(loss, best_loss)
        return best
