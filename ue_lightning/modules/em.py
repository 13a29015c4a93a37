"""ErrorMinimizingNoise: min-min noise of Huang et al., "Unlearnable Examples" (ICLR 2021).

One *round* alternates

1. ``train_steps`` SGD steps of a surrogate classifier on perturbed train batches
   ``clamp(x + delta, 0, 1)``, randomly cropped and flipped (``surrogate_augment``)
   (surrogate in train mode; Lightning runs these as ``training_step`` with manual
   optimisation), then
2. the stop check (``stop_on``, below), then
3. a noise pass (in ``on_train_batch_end``): PGD *descent* on the surrogate's
   cross-entropy, warm-started from the stored noise, surrogate frozen (BatchNorm in
   ``pass_mode``, running statistics untouched), over every train sample (sample-wise)
   or over a stratified subset, shuffled anew each round, whose per-sample results move
   each class's noise to their mean, batch by batch (class-wise).

The stop rule (``stop_on``):

* ``surrogate`` (default): stop once the surrogate, *in train mode*, classifies the
  perturbed batches of the round's SGD steps with accuracy >= ``stop_accuracy`` (taken
  from the forward of each step, before its update). This asks whether the surrogate has
  *learned* the noise, the property that makes a fresh network learn it too. The noise
  kept is the one the surrogate learned (no pass after the check).
* ``noise_pass`` (the reference code's rule): stop once the frozen surrogate (in
  ``pass_mode``) classifies the train set at its *new* noise with that accuracy. PGD has
  just fitted this noise to this surrogate, so the rule is met after 2-3 rounds on small
  sets, while the same surrogate in train mode is far from it and the noise is not learned
  by a fresh network (measured: benchmarks/RESULTS.md, "EM diagnosis").

The noise is state of a :class:`~ue_lightning.modules.generator_base.StoredNoiseGenerator`,
on the CPU (in memory or a node-shared memory-mapped file) and saved in the checkpoint, so
an interrupted generation resumes and ``ue predict --ckpt_path`` writes the noise file (see
:class:`~ue_lightning.callbacks.PerturbationWriter`).

Departures from the reference code (HanxunH/Unlearnable-Examples), on purpose:

* the default stop rule (above);
* the surrogate trains on crops/flips of the perturbed batch (``surrogate_augment``, as the
  victim will): without it the noise was a perfect shortcut for a victim trained without
  augmentation and none under crop + flip (measured: docs/methods.md, "Error-minimising noise");
* perturbed images are clamped to [0, 1] everywhere (the reference trains the surrogate
  and checks accuracy on the unclamped ``x + delta``; the maintainer called it a bug);
* the surrogate's batches come from the DataModule's shuffled train loader (the
  reference's sample-wise loader is unshuffled); the class-wise pass uses every subset
  sample (the reference drops the last incomplete batch);
* the ``noise_pass`` check reuses the pass's forward at each sample's new noise (the
  surrogate is frozen during the pass, so this equals a separate evaluation pass).
"""

from __future__ import annotations

import itertools
import math
from contextlib import contextmanager
from typing import Any, Iterator, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset
from torchmetrics.classification import MulticlassAccuracy
from torchvision.transforms.v2 import functional as TF

from ue_lightning.ops.attacks import budget_to_pixels, cross_entropy_sum, logit_margin_sum, pgd_minimize, project_linf
from ue_lightning.data.sampling import stratified_subset
from ue_lightning.models.batchnorm import batchnorm_statistics_frozen, in_mode
from ue_lightning.models.registry import build_classifier
from ue_lightning.ops.augment import random_crop_flip
from ue_lightning.console import progress
from ue_lightning.modules.generator_base import StoredNoiseGenerator
from ue_lightning.modules.noise_store import StoreKind
from ue_lightning.ops.shard_duplicates import first_unseen
from ue_lightning.ops.sample_rng import salt_of

CHECKPOINT_KEY = "error_minimizing_noise"
NOISE_LOSSES = {"cross_entropy": cross_entropy_sum, "logit_margin": logit_margin_sum}



class ErrorMinimizingNoise(StoredNoiseGenerator):
    """Error-minimising (min-min) noise, sample-wise or class-wise (Huang et al., ICLR 2021).

    Args:
        num_classes: number of classes (linked from the DataModule by the CLI).
        in_channels: image channels (linked from the DataModule by the CLI).
        image_size: side of the model's input in pixels (linked from the DataModule by the CLI).
        arch: surrogate architecture (see :func:`~ue_lightning.models.build_classifier`).
        width: surrogate width (None: the architecture's standard width).
        mode: ``samplewise`` (one delta per train sample, file (N, C, H, W)) or
            ``classwise`` (one delta per class, file (K, C, H, W)).
        epsilon: L-infinity budget in 1/255 units (8 = 8/255).
        step_size: PGD step in 1/255 units (0.8 = 0.8/255).
        steps: PGD steps per noise pass (None: 20 sample-wise, 1 class-wise).
        train_steps: surrogate SGD steps (train batches) before each noise pass; 0 keeps the
            surrogate fixed at its initialisation and runs a noise pass at every train batch.
        stop_accuracy: stop once the accuracy that ``stop_on`` names reaches this.
        stop_on: ``surrogate`` (train-mode accuracy of the surrogate on the perturbed
            batches of the round's SGD steps: has it learned the noise?) or ``noise_pass``
            (the reference's rule: the frozen surrogate's accuracy on the perturbed train
            set, the class-wise subset for class-wise noise, right after the pass).
        pass_mode: BatchNorm mode of the frozen surrogate in the noise pass: ``eval`` (the
            reference) or ``train`` (batch statistics; running statistics untouched).
        max_rounds: stop after this many noise passes (None: only the accuracy rule stops).
        surrogate_augment: train the surrogate on random crops/flips of the perturbed batch
            (``eot_padding``, ``eot_flip``), so that the noise it learns, and the noise the
            pass fits to it, survives the victim's augmentation. False: the reference.
        eot_samples: crop/flip draws per PGD step of the noise pass (expectation over
            transformations, as REM); 0: the unaugmented image only (the reference).
        eot_padding: crop padding in pixels of the two options above (CIFAR: 4).
        eot_flip: random horizontal flips in the two options above (CIFAR: True).
        lr: the surrogate's SGD learning rate (constant).
        momentum: the surrogate's SGD momentum.
        weight_decay: the surrogate's SGD weight decay.
        grad_clip: clip the surrogate's gradient norm at this (None: no clipping).
        seed: seed of the surrogate's initialisation and of the class-wise subset.
        noise_batch_size: per-device batch size of the noise pass (None: the DataModule's
            ``eval_batch_size``).
        classwise_subset: share of the train set (stratified, seeded) used by the
            class-wise noise pass and its stop check.
        noise_loss: what the noise pass descends: ``cross_entropy`` (the reference) or ``logit_margin``
            (the same sign steps, but no gradient underflow to exactly zero on samples the
            surrogate already classifies with certainty: see
            :func:`~ue_lightning.ops.attacks.logit_margin_sum`; ``ue protect`` uses it on small folders).
        noise_dtype, noise_store, noise_store_dir: how the noise state is stored, see
            :class:`~ue_lightning.modules.generator_base.StoredNoiseGenerator`.
    """

    checkpoint_key = CHECKPOINT_KEY
    no_noise_message = ("this checkpoint holds no error-minimising noise: pass the checkpoint of an "
                        "ErrorMinimizingNoise fit (`ue fit --config configs/data/<data>.yaml --config configs/generator/em-*.yaml`)")

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        image_size: int = 32,
        arch: str = "resnet18",
        width: int | None = None,
        mode: Literal["samplewise", "classwise"] = "samplewise",
        epsilon: float = 8.0,
        step_size: float = 0.8,
        steps: int | None = None,
        train_steps: int = 10,
        stop_accuracy: float = 0.99,
        stop_on: Literal["surrogate", "noise_pass"] = "surrogate",
        pass_mode: Literal["eval", "train"] = "eval",
        max_rounds: int | None = None,
        surrogate_augment: bool = True,
        eot_samples: int = 0,
        eot_padding: int = 4,
        eot_flip: bool = True,
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        grad_clip: float | None = 5.0,
        seed: int = 0,
        noise_batch_size: int | None = None,
        classwise_subset: float = 0.2,
        noise_loss: Literal["cross_entropy", "logit_margin"] = "cross_entropy",
        noise_dtype: Literal["float32", "float16"] = "float32",
        noise_store: StoreKind = "auto",
        noise_store_dir: str | None = None,
    ):
        super().__init__(epsilon=epsilon, seed=seed, noise_dtype=noise_dtype, noise_store=noise_store,
                         noise_store_dir=noise_store_dir)
        if mode not in ("samplewise", "classwise"):
            raise ValueError(f"mode={mode!r}: choose samplewise or classwise")
        if stop_on not in ("surrogate", "noise_pass"):
            raise ValueError(f"stop_on={stop_on!r}: choose surrogate or noise_pass")
        if pass_mode not in ("eval", "train"):
            raise ValueError(f"pass_mode={pass_mode!r}: choose eval or train")
        if noise_loss not in NOISE_LOSSES:
            raise ValueError(f"noise_loss={noise_loss!r}: choose one of {', '.join(NOISE_LOSSES)}")
        steps = (20 if mode == "samplewise" else 1) if steps is None else steps
        if steps < 1 or train_steps < 0:
            raise ValueError(f"steps={steps} must be >= 1 and train_steps={train_steps} >= 0")
        if eot_samples < 0 or eot_padding < 0:
            raise ValueError(f"eot_samples={eot_samples} and eot_padding={eot_padding} must be >= 0")
        if max_rounds is not None and max_rounds < 1:
            raise ValueError(f"max_rounds={max_rounds} must be >= 1 (or None for no cap)")
        if not 0.0 < classwise_subset <= 1.0:
            raise ValueError(f"classwise_subset={classwise_subset} must be in (0, 1]")
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.method = f"em-{mode}"
        self.classwise = mode == "classwise"
        self.step_size_px = budget_to_pixels(step_size, "step_size", allow_zero=False)
        self.steps = steps
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.model = build_classifier(arch, num_classes, in_channels=in_channels, image_size=image_size,
                                          width=width)
        self.surrogate_steps = 0
        self.rounds = 0  # noise passes done
        self.surrogate_accuracy = float("nan")  # train-mode accuracy on the last round's perturbed batches
        self.pass_accuracy = float("nan")  # frozen surrogate's accuracy at the noise of the last pass
        self.stopped = False  # the stop rule or the round cap has ended generation
        # train-mode accuracy of this round's SGD steps (micro: correct / seen), synced over ranks by compute()
        self.round_accuracy = MulticlassAccuracy(num_classes, average="micro")
        self._pass_dataset: Dataset | None = None  # the clean, unaugmented train set of the noise passes

    # ------------------------------------------------------------------ state
    def setup(self, stage: str) -> None:
        if stage == "fit" and getattr(self.trainer.datamodule, "augment", False):
            raise ValueError("EM noise is optimised on unaugmented images (Huang et al.): set `data.augment: false`")
        super().setup(stage)
        self._pass_dataset = None

    def noise_rows(self) -> int:
        return self.trainer.datamodule.clean_split("train").num_classes if self.classwise else super().noise_rows()

    def _extra_state(self) -> dict[str, Any]:
        return {"mode": self.hparams.mode, "surrogate_steps": self.surrogate_steps, "rounds": self.rounds,
                "surrogate_accuracy": self.surrogate_accuracy, "pass_accuracy": self.pass_accuracy}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        if state["mode"] != self.hparams.mode:
            raise ValueError(f"the checkpoint holds {state['mode']} noise but model.mode is {self.hparams.mode}: "
                             f"set `model.init_args.mode: {state['mode']}`")
        self.surrogate_steps = int(state["surrogate_steps"])
        self.rounds = int(state["rounds"])
        self.surrogate_accuracy = float(state.get("surrogate_accuracy", float("nan")))
        self.pass_accuracy = float(state.get("pass_accuracy", state.get("last_accuracy", float("nan"))))
        self.stopped = self._stop_reason() is not None  # by this run's rule and cap (a larger cap resumes)

    def configure_optimizers(self):
        h = self.hparams
        return torch.optim.SGD(self.model.parameters(), lr=h.lr, momentum=h.momentum, weight_decay=h.weight_decay)

    # ------------------------------------------------------------------ the noise
    def stored_delta(self, x: Tensor, y: Tensor, index: Tensor) -> Tensor:
        """The current noise of a batch (B, C, H, W) in pixel units, on ``x``'s device.

        Rows by ``index`` (sample-wise) or ``y`` (class-wise); centre-cropped when ``x`` is
        the centre crop of the stored image (folder datasets), and projected so that
        ``x + delta`` is in [0, 1].
        """
        rows = (y if self.classwise else index).cpu()
        delta = TF.center_crop(self.noise[rows], list(x.shape[-2:]))
        return project_linf(delta.to(device=x.device, dtype=x.dtype), x, self.radius_px)

    def generate(self, x: Tensor, y: Tensor, index: Tensor) -> Tensor:
        return self.stored_delta(x, y, index)

    def class_delta(self) -> Tensor:
        """Class-wise noise as the file stores it: int8 (K, C, H, W), 1/255 units, |delta| <= epsilon."""
        if not self.classwise:
            raise RuntimeError("class_delta() is for mode=classwise; sample-wise noise is written per sample")
        cap = math.floor(self.epsilon + 1e-6)
        return (self.noise.float() * 255.0).round().clamp(-cap, cap).to(torch.int8)

    def on_predict_start(self) -> None:
        if self.rounds == 0:
            raise RuntimeError("this generator has no noise yet (0 rounds): pass the fitted generator with "
                               "`ue predict ... --ckpt_path <generator checkpoint>`")
        self._check_covers(self.trainer.datamodule.train_indices())

    # ------------------------------------------------------------------ the rounds
    def _stop_reason(self) -> str | None:
        """Why generation is over (None: it is not): the accuracy rule or the round cap."""
        h = self.hparams
        accuracy = self.surrogate_accuracy if h.stop_on == "surrogate" else self.pass_accuracy
        if self.rounds >= 1 and accuracy >= h.stop_accuracy:  # at least one pass: zero noise is no result
            return f"{h.stop_on} accuracy {accuracy:.4f} >= stop_accuracy {h.stop_accuracy}"
        if h.max_rounds is not None and self.rounds >= h.max_rounds:
            return f"max_rounds={h.max_rounds} reached ({h.stop_on} accuracy {accuracy:.4f})"
        return None

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> int | None:
        if self.stopped:  # e.g. resumed from a checkpoint that had already stopped
            self.trainer.should_stop = True
            return -1
        return None

    def training_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> None:
        """One surrogate SGD step on ``clamp(x + delta, 0, 1)`` (none when ``train_steps == 0``)."""
        if self.hparams.train_steps == 0:
            return None
        x, y, index = batch
        opt = self.optimizers()
        perturbed = x + self.stored_delta(x, y, index)
        if self.hparams.surrogate_augment:
            perturbed = random_crop_flip(perturbed, self.hparams.eot_padding, self.hparams.eot_flip)
        logits = self.model(perturbed)
        loss = F.cross_entropy(logits, y)
        opt.zero_grad()
        self.manual_backward(loss)
        if self.hparams.grad_clip:
            self.clip_gradients(opt, gradient_clip_val=self.hparams.grad_clip, gradient_clip_algorithm="norm")
        opt.step()
        self.surrogate_steps += 1
        self.round_accuracy.update(logits.detach(), y)
        self.log("em/surrogate_loss", loss.detach(), prog_bar=True, batch_size=len(y))
        return None

    def _end_of_round_accuracy(self) -> float:
        """Train-mode accuracy of this round's SGD steps over every rank (NaN without one); resets the metric."""
        accuracy = float(self.round_accuracy.compute()) if self.round_accuracy.update_called else float("nan")
        self.round_accuracy.reset()
        return accuracy

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """After every ``train_steps`` surrogate steps (counted across epochs): the stop check, else a noise pass."""
        if self.surrogate_steps < (self.rounds + 1) * self.hparams.train_steps:
            return
        self.surrogate_accuracy = self._end_of_round_accuracy()
        if self.hparams.stop_on == "surrogate" and self._stop(self._stop_reason()):
            return
        with self.frozen_surrogate():
            if self.classwise:
                self._classwise_pass()
                self.pass_accuracy = self._classwise_accuracy()
            else:
                self.pass_accuracy = self._samplewise_pass()
        self._check_ranks_agree(f"after round {self.rounds + 1}")
        self.rounds += 1
        metrics = {"em/round": float(self.rounds), "em/surrogate_acc": self.surrogate_accuracy,
                   "em/pass_acc": self.pass_accuracy}
        for name, value in metrics.items():
            self.log(name, value, prog_bar=True, logger=False)
        for logger in self.loggers:  # every round, whatever log_every_n_steps says
            logger.log_metrics(metrics, step=self.global_step)
        self._stop(self._stop_reason())

    def _stop(self, reason: str | None) -> bool:
        if reason is None:
            return False
        self.stopped = True
        self.trainer.should_stop = True
        rank_zero_info(f"EM ({self.hparams.mode}) stops after {self.rounds} noise passes: {reason}")
        return True

    @contextmanager
    def frozen_surrogate(self) -> Iterator[None]:
        """The surrogate as the noise pass uses it: BatchNorm in ``pass_mode``, running statistics untouched."""
        with in_mode(self.model, self.hparams.pass_mode == "train"), batchnorm_statistics_frozen(self.model):
            yield

    # ------------------------------------------------------------------ noise passes
    def _pass_loader(self, which: Literal["all", "classwise_subset"]) -> DataLoader:
        """Unaugmented loader over the train set (in order) or the class-wise subset, sharded over ranks.

        The class-wise subset is shuffled anew each round (seeded by ``seed`` and the round,
        the same on every rank), so that every batch holds samples of most classes and each
        class's noise moves at nearly every batch, as in the reference.
        """
        dm = self.trainer.datamodule
        if self._pass_dataset is None:
            self._pass_dataset = dm.train_images()
        dataset: Dataset = self._pass_dataset
        if which == "classwise_subset":
            labels = dm.clean_split("train").targets[dm.train_indices()]
            size = max(1, round(self.hparams.classwise_subset * len(labels)))
            subset = stratified_subset(labels, size, self.seed)
            order = torch.randperm(size, generator=torch.Generator().manual_seed(self.seed * 100_003 + self.rounds))
            dataset = Subset(dataset, subset[order].tolist())
        return self._sharded_loader(dataset, self.hparams.noise_batch_size or dm.eval_batch_size)

    def _batches(self, which: Literal["all", "classwise_subset"]) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        for x, y, index in progress(self._pass_loader(which), desc=f"EM noise pass {self.rounds + 1}",
                                    trainer=self.trainer):
            yield x.to(self.device), y.to(self.device), index.to(self.device)

    def _minimize(self, x: Tensor, y: Tensor, index: Tensor, init: Tensor) -> Tensor:
        """PGD descent from ``init``; with ``eot_samples``, on the loss summed over per-sample crop/flips.

        The draws are a function of (seed, sample index, round, PGD step, draw): a sample gets
        the same noise whatever its batch or DDP rank.
        """
        h = self.hparams
        loss = NOISE_LOSSES[h.get("noise_loss", "cross_entropy")](self.model, y)
        if h.eot_samples:
            pgd_step = itertools.count()  # PGD calls the loss once per step: a fresh draw each step

            def loss(xp: Tensor, ce=loss) -> Tensor:
                k = next(pgd_step)
                return sum(ce(random_crop_flip(xp, h.eot_padding, h.eot_flip, index=index, seed=self.seed,
                                               salt=salt_of("em", self.rounds, k, e)))
                           for e in range(h.eot_samples))

        return pgd_minimize(loss, x, radius=self.radius_px, step_size=self.step_size_px, steps=self.steps, init=init)

    def _samplewise_pass(self) -> float:
        """PGD descent on every train sample from its stored noise; returns the accuracy at the new noise."""
        seen = torch.zeros(len(self.noise), dtype=torch.bool)
        correct = total = 0
        for x, y, index in self._batches("all"):
            delta = self._minimize(x, y, index, self.stored_delta(x, y, index))
            with torch.no_grad():
                hit = (self.model(x + delta).argmax(1) == y).to(torch.uint8)
            _, keep, hit = self._store_batch(index, delta, seen, (hit,))
            correct += int(hit[keep].sum())
            total += int(keep.sum())
        return correct / max(total, 1)

    def _classwise_pass(self) -> None:
        """Per batch: one PGD descent per sample from its class noise; each class noise := mean of its samples'."""
        seen = torch.zeros(self.trainer.datamodule.num_train_samples, dtype=torch.bool)
        for x, y, index in self._batches("classwise_subset"):
            eta = self._minimize(x, y, index, self.stored_delta(x, y, index))
            index, y, eta = self._gather(index), self._gather(y), self._gather(eta)
            keep = first_unseen(index, seen)
            order = index[keep].argsort()  # sum in index order: the same on one rank or many
            y, eta = y[keep][order], eta[keep][order].float()
            sums = torch.zeros(self.noise.shape, dtype=torch.float32).index_add_(0, y, eta)
            counts = torch.bincount(y, minlength=len(self.noise))
            present = counts > 0
            mean = sums[present] / counts[present].view(-1, 1, 1, 1)
            self.noise[present] = mean.clamp(-self.radius_px, self.radius_px).to(self.noise.dtype)

    @torch.no_grad()
    def _classwise_accuracy(self) -> float:
        """Surrogate accuracy on the class-wise subset with each class's noise added."""
        seen = torch.zeros(self.trainer.datamodule.num_train_samples, dtype=torch.bool)
        correct = total = 0
        for x, y, index in self._batches("classwise_subset"):
            hit = (self.model(x + self.stored_delta(x, y, index)).argmax(1) == y).to(torch.uint8)
            index, hit = self._gather(index), self._gather(hit)
            keep = first_unseen(index, seen)
            correct += int(hit[keep].sum())
            total += int(keep.sum())
        return correct / max(total, 1)
