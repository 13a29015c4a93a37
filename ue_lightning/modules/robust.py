"""RobustNoiseGenerator: REM (Fu et al., ICLR 2022) and data collapse (Fang et al., Algorithm 1).

Per training batch (manual optimisation, one surrogate update per batch as REM does):

1. **defensive noise** ``delta_u`` (radius rho_u = ``epsilon``): ``steps`` projected sign steps

       delta_u <- proj(delta_u - alpha_u * sign(g_ce) - alpha_s * sign(grad ||s(x + delta_u, y)||))

   where ``g_ce`` is, for ``form="rem"`` (min-min-max), the gradient of
   ``sum_e CE(f(T_e(x + delta_u) + delta_a,e), y)`` over ``eot_samples`` random crop/flips
   T_e, each ``delta_a,e`` a PGD maximiser at ``T_e(x + delta_u)`` held fixed (Danskin), and
   for ``form="plain"`` simply ``grad CE(f(x + delta_u), y)`` (error-minimising noise). The
   score term is present only with a score model (``score_checkpoint``) and alpha_s > 0
   (:func:`score_norm`: per-sample L2 norm of the class-conditional score, summed);
2. **adversarial noise** ``delta_a`` (radius rho_a = ``adv_radius``): PGD ascent from a random
   start at ``x_u = round(x + delta_u)`` (``form="rem"``: at a fresh crop/flip of it);
3. **one SGD step** of the surrogate on ``CE(f(x_u + delta_a), y)``, BatchNorm in train mode.

Steps 1 and 2 run with the surrogate frozen, BatchNorm in ``inner_mode`` (``eval``, as REM),
gradients by :func:`torch.autograd.grad` on the perturbation only; step 3 is the only
place that writes parameter gradients. All random draws (starts, crops, flips) come from
:func:`~ue_lightning.ops.sample_rng.indexed_uniform` keyed by (seed, sample index, salt), the
salt naming the training step (or the final pass), the role and the EOT draw, so
:meth:`RobustNoiseGenerator.generate` (the final noise of ``ue predict``) gives a sample the
same noise whatever its batch or DDP rank.

Units: configs give every budget in 1/255 (``epsilon: 8``); attributes ending in
``_px`` and everything passed to the attacks are pixel units (images in [0, 1]).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Literal, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics.classification import MulticlassAccuracy

from ue_lightning.ops.attacks import (box_start, budget_to_pixels, cross_entropy_sum, input_gradient, pgd_maximize,
                                  project_linf)
from ue_lightning.ops.augment import random_crop_flip
from ue_lightning.models.batchnorm import in_mode
from ue_lightning.models.frozen_score import load_frozen_score
from ue_lightning.models.registry import build_classifier
from ue_lightning.modules.generator_base import NoiseGenerator, round_to_pixel_grid
from ue_lightning.modules.unregistered import Unregistered
from ue_lightning.ops.sample_rng import indexed_uniform, salt_of

ScoreFn = Callable[[Tensor, Tensor], Tensor]


class ScoreModel(Protocol):
    """What the generator needs from a ScoreEstimator: a frozen, differentiable score."""

    def score(self, x: Tensor, y: Tensor) -> Tensor: ...

    def to(self, device: torch.device) -> "ScoreModel": ...


def score_norm(score_fn: ScoreFn, x: Tensor, y: Tensor) -> Tensor:
    """``sum_b ||s(x_b, y_b)||_2``: the data-collapse objective (Fang et al.), a scalar.

    Args:
        score_fn: ``(x (B, C, H, W) in [0, 1], y (B,)) -> score (B, C, H, W)``, differentiable in x.
        x: perturbed images, pixels in [0, 1].
        y: int64 labels (B,).

    Descending it moves each sample towards a high-density point of its class
    (where the score vanishes), i.e. collapses the class.
    """
    return score_fn(x, y).flatten(1).norm(dim=1).sum()


def load_score_model(checkpoint_path: str, *, num_classes: int, in_channels: int, image_size: int,
                     fix: str | None = None) -> ScoreModel:
    """The frozen score network of the ScoreEstimator checkpoint ``checkpoint_path`` (:func:`load_frozen_score`;
    ``fix`` ends its errors)."""
    return load_frozen_score(checkpoint_path, num_classes=num_classes, in_channels=in_channels,
                             image_size=image_size, fix=fix)


class RobustNoiseGenerator(NoiseGenerator):
    """Robust error-minimising noise (REM) and its data-collapse variant.

    Defaults are REM's CIFAR-10 settings (``scripts/cifar10/gen_rem.sh`` of the REM code):
    rho_u 8, alpha_u 1.6, 10 steps; rho_a 4, 0.8, 10 steps; 5 EOT samples; ResNet-18;
    SGD lr 0.1, momentum 0.9, weight decay 5e-4, lr x0.1 every 2000 steps (5000 steps,
    batch 128 are the trainer's and DataModule's business). Fang et al.'s collapse uses the
    same radii (rho_u 8/255, rho_a 4/255, ResNet-18: paper). ``score_step_size`` defaults to
    alpha_u (ours: no value for alpha_s is confirmed from a public source). ``start: random``,
    a fresh start per call and ``inner_mode: eval`` are REM's code.

    Args:
        arch: surrogate architecture (``build_classifier``).
        width: surrogate width (None: the architecture's standard width).
        num_classes: number of classes (linked from the DataModule by the CLI).
        in_channels: image channels (linked from the DataModule by the CLI).
        image_size: side of the model's input in pixels (linked from the DataModule by the CLI).
        epsilon: rho_u, the noise budget, 1/255 units.
        step_size: alpha_u, the noise's PGD step, 1/255 units.
        steps: K_u, the noise's PGD steps per training step.
        adv_radius: rho_a, 1/255 units (0: no adversary, REM reduces to EOT error-minimising noise).
        adv_step_size: the adversary's PGD step, 1/255 units.
        adv_steps: K_a, the adversary's PGD steps.
        eot_samples: random crop/flips per step in ``form="rem"`` (REM's ``samp_num``).
        eot_padding: crop padding in pixels (None: ``image_size // 8``, CIFAR's 4).
        eot_flip: random horizontal flips (off for digits, which are not mirror-symmetric).
        form: ``rem`` (min-min-max with EOT) or ``plain`` (min over CE(f(x + delta_u)), no
            augmentation, no inner max; the surrogate update has no augmentation either).
        start: ``random`` (uniform in the rho_u box) or ``zero`` start of delta_u.
        inner_mode: BatchNorm mode of the surrogate during steps 1-2 in training. ``generate``
            always uses ``eval`` (batch-independent noise, REM's final pass).
        score_checkpoint: a ScoreEstimator checkpoint: adds the collapse step (method
            ``collapse``); None: REM (method ``rem``).
        score_step_size: alpha_s, 1/255 units (None: equal to ``step_size``; 0: no score step).
        lr: the surrogate's SGD learning rate.
        momentum: the surrogate's SGD momentum.
        weight_decay: the surrogate's SGD weight decay.
        lr_decay_steps: multiply the learning rate by ``lr_decay_rate`` every this many steps.
        lr_decay_rate: the factor of that decay.
        seed: seed of every per-sample random draw.
    """

    def __init__(
        self,
        arch: str = "resnet18",
        num_classes: int = 10,
        in_channels: int = 3,
        image_size: int = 32,
        width: int | None = None,
        epsilon: float = 8.0,
        step_size: float = 1.6,
        steps: int = 10,
        adv_radius: float = 4.0,
        adv_step_size: float = 0.8,
        adv_steps: int = 10,
        eot_samples: int = 5,
        eot_padding: int | None = None,
        eot_flip: bool = True,
        form: Literal["rem", "plain"] = "rem",
        start: Literal["random", "zero"] = "random",
        inner_mode: Literal["eval", "train"] = "eval",
        score_checkpoint: str | None = None,
        score_step_size: float | None = None,
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        lr_decay_steps: int = 2000,
        lr_decay_rate: float = 0.1,
        seed: int = 0,
    ):
        super().__init__(epsilon=epsilon, seed=seed)
        self.save_hyperparameters()
        self.automatic_optimization = False
        for name, value, choices in (("form", form, ("rem", "plain")), ("start", start, ("random", "zero")),
                                     ("inner_mode", inner_mode, ("eval", "train"))):
            if value not in choices:
                raise ValueError(f"{name}={value!r}: choose one of {', '.join(choices)}")
        if steps < 1 or adv_steps < 0 or eot_samples < 1 or lr_decay_steps < 1:
            raise ValueError("steps and eot_samples must be >= 1, adv_steps >= 0, lr_decay_steps >= 1")
        if score_checkpoint is None and score_step_size:
            raise ValueError(f"score_step_size={score_step_size} needs a score model: set score_checkpoint "
                             "to a ScoreEstimator checkpoint (e.g. runs/score/<name>/checkpoints/last.ckpt)")
        self.step_size_px = budget_to_pixels(step_size, "step_size", allow_zero=False)
        self.adv_radius_px = budget_to_pixels(adv_radius, "adv_radius")
        self.adv_step_size_px = budget_to_pixels(adv_step_size, "adv_step_size")
        alpha_s = step_size if score_step_size is None else score_step_size
        self.score_step_size_px = budget_to_pixels(alpha_s, "score_step_size") if score_checkpoint else 0.0
        self.eot_padding = image_size // 8 if eot_padding is None else int(eot_padding)
        self.method = "collapse" if self.score_step_size_px > 0 else "rem"
        self.model = build_classifier(arch, num_classes, in_channels=in_channels, image_size=image_size, width=width)
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.train_clean_acc = MulticlassAccuracy(num_classes, average="micro")
        # The score model is frozen and shared, not ours: kept out of state_dict, parameters() and .to().
        self._score_model: Unregistered[ScoreModel] = Unregistered()

    # ------------------------------------------------------------------ score model
    def setup(self, stage: str) -> None:
        self.score_model()

    def score_model(self, device: torch.device | None = None, fix: str | None = None) -> ScoreModel | None:
        """The frozen ScoreEstimator (loaded on first use, moved to ``device``), or None for REM. ``fix``: how to get
        a right checkpoint, ending a loading error (None: how to train one)."""
        if self.score_step_size_px == 0:
            return None
        if self._score_model.value is None:
            h = self.hparams
            self._score_model.value = load_score_model(h.score_checkpoint, num_classes=h.num_classes,
                                                       in_channels=h.in_channels, image_size=h.image_size,
                                                       fix=fix)
        return self._score_model.on(device)

    # ------------------------------------------------------------------ the three steps
    def uniform_box(self, index: Tensor, x: Tensor, radius: float, salt: int) -> Tensor:
        """Per-sample uniform start in ``[-radius, radius]`` (B, C, H, W), projected so x + start is in [0, 1]."""
        return box_start(indexed_uniform(index, tuple(x.shape[1:]), self.seed, salt), x, radius)

    def augment(self, x: Tensor, index: Tensor, salt: int) -> Tensor:
        """Differentiable per-sample crop (``eot_padding``) and flip (``eot_flip``)."""
        return random_crop_flip(x, self.eot_padding, self.hparams.eot_flip, index=index, seed=self.seed, salt=salt)

    def adversary(self, x: Tensor, y: Tensor, index: Tensor, salt: int) -> Tensor:
        """Step 2: PGD delta_a (pixel units) maximising CE at ``x`` from a per-sample random start."""
        if self.adv_radius_px == 0:
            return torch.zeros_like(x)
        start = self.uniform_box(index, x, self.adv_radius_px, salt)
        return pgd_maximize(cross_entropy_sum(self.model, y), x, radius=self.adv_radius_px,
                            step_size=self.adv_step_size_px, steps=self.hparams.adv_steps, init=start)

    def classifier_gradient(self, x: Tensor, y: Tensor, index: Tensor, delta: Tensor, stream: str, k: int) -> Tensor:
        """d/d delta_u of the step-1 classification loss (``form`` decides which), (B, C, H, W)."""
        loss = cross_entropy_sum(self.model, y)
        if self.hparams.form == "plain":
            return input_gradient(loss, x, delta)[1]
        total = torch.zeros_like(delta)
        for e in range(self.hparams.eot_samples):
            aug_salt = salt_of(stream, "eot", k, e)
            with torch.no_grad():
                x_aug = self.augment(x + delta, index, aug_salt)
            delta_a = self.adversary(x_aug, y, index, salt_of(stream, "eot-adversary", k, e))
            # Danskin: delta_a held fixed, the gradient reaches delta_u through the augmentation.
            total += input_gradient(lambda xp: loss(self.augment(xp, index, aug_salt) + delta_a), x, delta)[1]
        return total

    def defend(self, x: Tensor, y: Tensor, index: Tensor, stream: str) -> Tensor:
        """Step 1: delta_u (B, C, H, W), pixel units, |delta_u| <= rho_u, x + delta_u in [0, 1].

        ``stream`` names the random draws (``"step<t>"`` in training, ``"final"`` for generate).
        The caller sets the surrogate's mode and freezes it (see :meth:`inner_loop`).
        """
        h = self.hparams
        with torch.inference_mode(False), torch.enable_grad():
            x, y, index = x.detach().clone(), y.detach().clone(), index.detach().clone()
            if h.start == "random":
                delta = self.uniform_box(index, x, self.radius_px, salt_of(stream, "start"))
            else:
                delta = torch.zeros_like(x)
            score = self.score_model(x.device)
            for k in range(h.steps):
                step = self.step_size_px * self.classifier_gradient(x, y, index, delta, stream, k).sign()
                if score is not None:
                    _, g_score = input_gradient(lambda xp: score_norm(score.score, xp, y), x, delta)
                    step = step + self.score_step_size_px * g_score.sign()
                delta = project_linf(delta - step, x, self.radius_px).detach()
        return delta

    @contextmanager
    def inner_loop(self, mode: Literal["eval", "train"]) -> Iterator[None]:
        """Surrogate frozen (no parameter gradients) and BatchNorm in ``mode``; restored on exit."""
        with in_mode(self.model, mode == "train", frozen=True):
            yield

    def generate(self, x: Tensor, y: Tensor, index: Tensor) -> Tensor:
        """The final noise (``ue predict``): step 1 from its start point, BatchNorm in eval mode."""
        with self.inner_loop("eval"):
            return self.defend(x, y, index, "final")

    def update_batch(self, x: Tensor, y: Tensor, index: Tensor, step: int) -> tuple[Tensor, Tensor]:
        """Steps 1-2 for training step ``step``: ``(delta_u, x_u + delta_a)``, the update's input."""
        stream = f"step{step}"
        with self.inner_loop(self.hparams.inner_mode):
            delta_u = self.defend(x, y, index, stream)
            x_u = round_to_pixel_grid(x + delta_u)  # as the noise file will store it (REM trains on int8 noise)
            if self.hparams.form == "rem":
                x_u = self.augment(x_u, index, salt_of(stream, "update-augment"))
            delta_a = self.adversary(x_u, y, index, salt_of(stream, "update-adversary"))
        return delta_u, (x_u + delta_a).detach()

    # ------------------------------------------------------------------ Lightning
    def forward(self, x: Tensor) -> Tensor:
        """Surrogate logits (B, num_classes) of images (B, C, H, W) in [0, 1]."""
        return self.model(x)

    def training_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y, index = batch
        _, x_adv = self.update_batch(x, y, index, self.global_step)
        optimizer, scheduler = self.optimizers(), self.lr_schedulers()
        lr = optimizer.param_groups[0]["lr"]  # the rate of this step (the scheduler steps after it)
        self.model.train()
        logits = self.model(x_adv)
        loss = F.cross_entropy(logits, y)
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()
        scheduler.step()
        with self.inner_loop("eval"), torch.no_grad():
            clean_logits = self.model(x)
        self.train_acc(logits.detach(), y)
        self.train_clean_acc(clean_logits, y)
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=len(y))
        self.log("train/acc", self.train_acc, prog_bar=True, on_step=True, on_epoch=True)
        self.log("train/clean_acc", self.train_clean_acc, on_step=True, on_epoch=True)
        self.log("train/lr", lr, batch_size=len(y))
        return loss.detach()

    def configure_optimizers(self):
        h = self.hparams
        optimizer = torch.optim.SGD(self.model.parameters(), lr=h.lr, momentum=h.momentum, weight_decay=h.weight_decay)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=h.lr_decay_steps, gamma=h.lr_decay_rate)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
