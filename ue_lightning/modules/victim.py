"""VictimClassifier: the trainer who wants the data, standard or adversarially trained."""

from __future__ import annotations

from typing import Literal

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics.classification import MulticlassAccuracy

from ue_lightning.ops.attacks import budget_to_pixels, cross_entropy_sum, pgd_maximize
from ue_lightning.models.airbench import PatchWhitening
from ue_lightning.models.batchnorm import in_mode
from ue_lightning.models.registry import build_classifier
from ue_lightning.modules.optim import optimizer_with_schedule

#: Train images (per process) whose 2x2 patches set the airbench whitening layer.
WHITENING_IMAGES = 5000


class VictimClassifier(L.LightningModule):
    """Standard (``adv_radius=0``) or PGD adversarial training (Madry et al.) of a classifier.

    The measure of protection is the clean test accuracy (``test/acc``); ``train/acc`` is
    the accuracy on the (possibly protected) train batches, and ``test/robust_acc`` the
    PGD accuracy at ``adv_radius`` when ``robust_eval`` is set.

    Train labels may be class indices (B,) or soft targets (B, num_classes), as the DataModule's
    ``mixup`` and ``cutmix`` defences make them: the loss is then the soft-target cross-entropy
    and ``train/acc`` counts a prediction right when it is the class with the largest weight.

    Train images may also arrive as several augmented views of each (B, V, C, H, W), as the
    DataModule's ``ueraser-max`` defence makes them: for the first ``worst_view_fraction`` of the
    steps the loss is each image's worst view's (UEraser-Max's adversarial augmentation), then
    the first view's alone; ``train/acc`` counts the first view.

    The fast victim (``arch: airbench``, ``configs/victim/airbench-cpu.yaml``): when training
    starts, its frozen first layer is set to whiten the 2x2 patches of the first
    ``WHITENING_IMAGES`` (5000) train images the train loader serves (augmented, protected if
    the data is; averaged over processes under DDP), once: a resumed fit keeps the layer it
    saved. The loader's random state is restored afterwards.

    Args:
        arch: ``vgg16``, ``resnet18``, ``resnet50``, ``densenet121``, ``wrn34_10`` or ``airbench``
            (the fast victim, whitened from the train data when fitting starts).
        num_classes: number of classes (linked from the DataModule by the CLI).
        in_channels: image channels (linked from the DataModule by the CLI).
        image_size: side of the model's input in pixels (linked from the DataModule by the CLI).
        width: channels of the first stage (None: the architecture's standard width).
        adv_radius: adversarial-training radius rho_a, in 1/255 units (0: standard training).
        adv_steps: PGD steps of the training attack (REM's evaluation: 10).
        adv_step_size: PGD step in 1/255 units (None: adv_radius / 4, as REM).
        attack_mode: BatchNorm mode while the attack runs (``eval``: statistics untouched).
        robust_eval: also report PGD accuracy on the test set.
        lr: learning rate (at the schedule's peak).
        optimizer: ``sgd`` (the papers' victims) or ``adamw`` (the ViT's, configs/victim/vit.yaml).
        momentum: SGD momentum (``nesterov`` too: SGD only).
        weight_decay: the optimiser's weight decay.
        schedule: ``cosine`` over all steps, ``step`` (x ``gamma`` at ``milestones``), ``constant``
            or ``triangular`` (linear rise over ``warmup``, then linear fall: the fast victim's).
        milestones: fractions of training at which ``step`` multiplies the rate by ``gamma``.
        gamma: the factor of each ``step`` decay.
        warmup: fraction of the steps over which ``triangular`` rises linearly to ``lr`` before
            it falls linearly to nearly 0 at the end (0: a plain linear decay).
        nesterov: Nesterov momentum in SGD.
        label_smoothing: weight of the uniform distribution mixed into the train targets
            (0: none; airbench uses 0.2). Test and validation accuracy are unaffected.
        tta_flip: at validation and test, average the logits of each image and its horizontal
            mirror (not applied to ``test/robust_acc``'s attack or scoring).
        fit_whitening: ``airbench`` only: fit its first layer's patch whitening from the train
            batches when training starts (False: keep the unfitted layer, each patch pixel with
            both signs).
        worst_view_fraction: with views of each train image (``data.defence: ueraser-max``), the
            share of the training steps whose loss is the mean over images of their worst view's
            cross-entropy, one forward pass a view (UEraser's README: the first 60 of 200 epochs);
            afterwards the first view is trained on alone. Adversarial training is refused with views.
    """

    #: The DataModule may send soft targets (mixup, cutmix) to ``training_step``.
    accepts_soft_targets = True
    #: ... and several views of each image (ueraser-max), (B, V, C, H, W).
    accepts_views = True

    def __init__(
        self,
        arch: str = "resnet18",
        num_classes: int = 10,
        in_channels: int = 3,
        image_size: int = 32,
        width: int | None = None,
        adv_radius: float = 0.0,
        adv_steps: int = 10,
        adv_step_size: float | None = None,
        attack_mode: Literal["train", "eval"] = "eval",
        robust_eval: bool = False,
        lr: float = 0.1,
        optimizer: Literal["sgd", "adamw"] = "sgd",
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        schedule: Literal["cosine", "step", "constant", "triangular"] = "cosine",
        milestones: tuple[float, ...] = (0.4, 0.8),
        gamma: float = 0.1,
        warmup: float = 0.2,
        nesterov: bool = False,
        label_smoothing: float = 0.0,
        tta_flip: bool = False,
        fit_whitening: bool = True,
        worst_view_fraction: float = 0.3,
    ):
        super().__init__()
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing={label_smoothing} must be in [0, 1)")
        if not 0.0 <= worst_view_fraction <= 1.0:
            raise ValueError(f"worst_view_fraction={worst_view_fraction} must be in [0, 1] (a share of the steps)")
        self.save_hyperparameters()
        self.adv_radius_px = budget_to_pixels(adv_radius, "adv_radius")
        step = adv_radius / 4 if adv_step_size is None else adv_step_size
        self.adv_step_size_px = budget_to_pixels(step, "adv_step_size") if adv_radius > 0 else 0.0
        self.model = build_classifier(arch, num_classes, in_channels=in_channels, image_size=image_size, width=width)
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_robust_acc = MulticlassAccuracy(num_classes, average="micro")

    def forward(self, x: Tensor) -> Tensor:
        """Logits (B, num_classes) of images (B, C, H, W) with pixels in [0, 1]."""
        return self.model(x)

    def eval_logits(self, x: Tensor) -> Tensor:
        """Validation/test logits (B, num_classes): with ``tta_flip``, the mean over x and x mirrored."""
        logits = self.model(x)
        if self.hparams.tta_flip:
            logits = (logits + self.model(x.flip(-1))) / 2
        return logits

    def loss(self, logits: Tensor, y: Tensor) -> Tensor:
        """Mean cross-entropy of logits (B, K) against class indices (B,) or soft targets (B, K),
        with ``label_smoothing``."""
        return F.cross_entropy(logits, y, label_smoothing=self.hparams.label_smoothing)

    def on_train_start(self) -> None:
        """airbench only: whiten the first layer from the first train batches, unless already done."""
        whitening = getattr(self.model.backbone, "whiten", None)
        if not isinstance(whitening, PatchWhitening) or bool(whitening.fitted) or not self.hparams.fit_whitening:
            return
        images, count = [], 0
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            for x, *_ in self.trainer.train_dataloader:
                images.append((x[:, 0] if x.ndim == 5 else x).to(self.device))  # views: the first
                count += len(x)
                if count >= WHITENING_IMAGES:
                    break
            covariance = whitening.patch_covariance(self.model.normalize(torch.cat(images)[:WHITENING_IMAGES]))
        if self.trainer.world_size > 1:
            covariance = self.all_gather(covariance).mean(0)
        whitening.fit(covariance)

    def adversarial(self, x: Tensor, y: Tensor) -> Tensor:
        """PGD examples at ``adv_radius`` (random start), BatchNorm in ``attack_mode``."""
        with in_mode(self.model, self.hparams.attack_mode == "train"):
            delta = pgd_maximize(cross_entropy_sum(self.model, y), x, radius=self.adv_radius_px,
                                 step_size=self.adv_step_size_px, steps=self.hparams.adv_steps, random_start=True)
        return x + delta

    def views_loss(self, views: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """Logits of the first view (B, num_classes) and the loss of ``views`` (B, V, C, H, W): during the first
        ``worst_view_fraction`` of the steps the mean over images of their largest cross-entropy over views (one
        forward pass a view, so BatchNorm sees batches of B as in UEraser's code), afterwards the first view's."""
        if self.adv_radius_px > 0:
            raise ValueError("views of each train image (data.defence ueraser-max) cannot be adversarially "
                             "trained on; use data.defence ueraser, or adv_radius 0")
        if self.global_step >= self.hparams.worst_view_fraction * self.trainer.estimated_stepping_batches:
            logits = self.model(views[:, 0])
            return logits, self.loss(logits, y)
        logits = [self.model(views[:, v]) for v in range(views.shape[1])]
        losses = torch.stack([F.cross_entropy(out, y, reduction="none", label_smoothing=self.hparams.label_smoothing)
                              for out in logits])  # (V, B)
        return logits[0], losses.amax(0).mean()

    def training_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y, _ = batch
        if x.ndim == 5:
            logits, loss = self.views_loss(x, y)
        else:
            if self.adv_radius_px > 0:
                x = self.adversarial(x, y)
            logits = self.model(x)
            loss = self.loss(logits, y)  # y: class indices (B,) or soft targets (B, K)
        self.train_acc(logits.detach(), y.argmax(1) if y.ndim == 2 else y)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(y))
        self.log("train/acc", self.train_acc, prog_bar=True, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> None:
        x, y, _ = batch
        self.val_acc(self.eval_logits(x), y)
        self.log("val/acc", self.val_acc, prog_bar=True, on_epoch=True)

    def test_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> None:
        x, y, _ = batch
        self.test_acc(self.eval_logits(x), y)
        self.log("test/acc", self.test_acc, on_epoch=True)
        if self.hparams.robust_eval and self.adv_radius_px > 0:
            self.test_robust_acc(self.model(self.adversarial(x, y)), y)
            self.log("test/robust_acc", self.test_robust_acc, on_epoch=True)

    def configure_optimizers(self):
        h = self.hparams
        return optimizer_with_schedule(self.parameters(), self.trainer.estimated_stepping_batches, lr=h.lr,
                                       optimizer=h.optimizer, momentum=h.momentum, weight_decay=h.weight_decay,
                                       schedule=h.schedule, milestones=h.milestones, gamma=h.gamma,
                                       nesterov=h.nesterov, warmup=h.warmup)
