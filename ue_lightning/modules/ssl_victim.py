"""ContrastiveVictim: the unsupervised trainer who wants the data (SimCLR, MoCo or SimSiam + linear probe).

``ue fit`` trains a contrastive encoder (``method``: SimCLR, MoCo or SimSiam, the three TUE names:
:mod:`~ue_lightning.modules.contrastive`) on the train set the DataModule serves (protected or
clean). ``ue test`` then fits a linear probe on the frozen encoder's features and
reports its accuracy on the clean test set as ``test/acc``: the "unsupervised test"
of Transferable Unlearnable Examples (Ren et al., ICLR 2023), whose code was never
released.

Which data the probe learns from (``probe_data``):

* ``protected`` (default): the train set as published, i.e. with the noise and the
  labels, read without augmentation. This is the threat model: the unauthorised
  trainer holds only the published data, so both the encoder and the probe learn from
  it. (The paper's evaluation text could not be checked here; this choice follows its
  threat model.)
* ``clean``: the clean train images with their labels, which isolates how much the
  *encoder* was spoiled (an optimistic upper bound for the trainer).

The probe is multinomial logistic regression on standardised features, fitted full
batch by L-BFGS (deterministic, no epochs to tune); ``test/probe_train_acc`` is its
accuracy on the data it was fitted on (high with shortcut noise).
"""

from __future__ import annotations

from typing import Callable, Literal, Sequence

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchmetrics.classification import MulticlassAccuracy

from ue_lightning.console import progress
from ue_lightning.models.batchnorm import in_mode
from ue_lightning.modules.contrastive import ContrastiveMethod, build_learner, learner_optimizer
from ue_lightning.modules.simclr import simclr_views
from ue_lightning.modules.unregistered import Unregistered
from ue_lightning.ops.shard_duplicates import first_occurrences


class LinearProbe(nn.Module):
    """Logistic regression on standardised features: ``Linear((f - mean) / std)``."""

    def __init__(self, mean: Tensor, std: Tensor, num_classes: int):
        super().__init__()
        self.register_buffer("mean", mean.detach().clone())
        self.register_buffer("std", std.detach().clone())
        self.linear = nn.Linear(len(mean), num_classes)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, features: Tensor) -> Tensor:
        return self.linear((features - self.mean) / self.std)


def fit_linear_probe(features: Tensor, labels: Tensor, num_classes: int, *, steps: int = 500,
                     weight_decay: float = 1e-4, on_evaluation: Callable[[], object] | None = None) -> LinearProbe:
    """Fit :class:`LinearProbe` on (N, D) features by full-batch L-BFGS (at most ``steps`` iterations).

    Minimises mean cross-entropy + ``weight_decay / 2 * ||W||^2`` (a convex problem: the
    result does not depend on a seed). ``on_evaluation`` is called at each evaluation of the
    loss (at most ``probe_evaluations(steps)``), e.g. to advance a progress bar.
    """
    with torch.inference_mode(False), torch.enable_grad():
        features, labels = features.detach().clone().float(), labels.detach().clone()
        probe = LinearProbe(features.mean(0), features.std(0).clamp_min(1e-6), num_classes).to(features.device)
        optimizer = torch.optim.LBFGS(probe.linear.parameters(), lr=1.0, max_iter=steps, history_size=20,
                                      line_search_fn="strong_wolfe")

        def closure() -> Tensor:
            if on_evaluation is not None:
                on_evaluation()
            optimizer.zero_grad()
            loss = F.cross_entropy(probe(features), labels) + weight_decay / 2 * probe.linear.weight.pow(2).sum()
            loss.backward()
            return loss

        optimizer.step(closure)
    return probe.requires_grad_(False)


def probe_evaluations(steps: int) -> int:
    """The most loss evaluations L-BFGS makes in ``steps`` iterations (torch's ``max_eval`` default)."""
    return steps * 5 // 4


def probe_train_set(datamodule: L.LightningDataModule, protected: bool) -> Dataset:
    """The DataModule's train samples without augmentation (the test transform), with or without their noise."""
    test = getattr(datamodule, "test_set", None)
    if not hasattr(datamodule, "train_images") or test is None:
        raise TypeError("ContrastiveVictim's linear probe reads the UEDataModule's train and test sets; use "
                        "UEDataModule")
    return datamodule.train_images("victim", noised=protected, transform=test.transform)


class ContrastiveVictim(L.LightningModule):
    """A contrastive learner on the (protected) train set, evaluated by a linear probe on clean test data.

    Train batches arrive augmented by the DataModule (crop + flip); two SimCLR views of
    each are drawn here (random resized crop, flip, colour jitter, grayscale), for every ``method``.

    Args:
        method: ``simclr``, ``moco`` or ``simsiam`` (heads, losses, default optimisers:
            :mod:`~ue_lightning.modules.contrastive`).
        arch: encoder architecture (CIFAR ResNet-18 by default).
        width: encoder width (None: the architecture's standard width).
        num_classes: number of classes (linked from the DataModule by the CLI).
        in_channels: image channels (linked from the DataModule by the CLI).
        image_size: side of the model's input in pixels (linked from the DataModule by the CLI).
        proj_dim: output size of the projection head (None: SimCLR and MoCo 128, SimSiam 2048).
        temperature: contrastive temperature (None: SimCLR 0.5, MoCo 0.1, as TUE's code).
        queue_size: MoCo's queue of negative keys (4096).
        momentum: MoCo's key-encoder momentum (0.99).
        symmetric: MoCo's symmetric loss, both views as queries (True).
        lr: learning rate (None: SimCLR Adam 1e-3, MoCo SGD 0.3, SimSiam SGD 0.06, as TUE's code).
        weight_decay: weight decay (None: SimCLR 1e-6, MoCo 1e-4, SimSiam 5e-4).
        crop_scale: SimCLR view random-resized-crop scale range.
        flip_p: SimCLR view horizontal-flip probability.
        probe_data: ``protected`` or ``clean`` train data for the probe (module docstring).
        probe_steps: L-BFGS iterations of the linear probe.
        probe_weight_decay: L2 weight of the linear probe.

    The three ``probe_*`` settings are read at test time from the command line or config, never
    from the checkpoint (they are not saved as hyperparameters).
    """

    def __init__(
        self,
        method: ContrastiveMethod = "simclr",
        arch: str = "resnet18",
        num_classes: int = 10,
        in_channels: int = 3,
        image_size: int = 32,
        width: int | None = None,
        proj_dim: int | None = None,
        temperature: float | None = None,
        queue_size: int = 4096,
        momentum: float = 0.99,
        symmetric: bool = True,
        lr: float | None = None,
        weight_decay: float | None = None,
        crop_scale: Sequence[float] = (0.08, 1.0),
        flip_p: float = 0.5,
        probe_data: Literal["protected", "clean"] = "protected",
        probe_steps: int = 500,
        probe_weight_decay: float = 1e-4,
    ):
        super().__init__()
        if probe_data not in ("protected", "clean"):
            raise ValueError(f"probe_data={probe_data!r}: choose protected or clean")
        # The probe settings are test-time choices: kept out of the saved hyperparameters, because
        # `ue test --ckpt_path` gives a checkpoint's hyperparameters precedence over the command line.
        self.save_hyperparameters(ignore=["probe_data", "probe_steps", "probe_weight_decay"])
        self.probe_data, self.probe_steps, self.probe_weight_decay = probe_data, probe_steps, probe_weight_decay
        self.net = build_learner(method, arch, in_channels, image_size, width, proj_dim, temperature, queue_size,
                                 momentum, symmetric)
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")
        # the probe is fitted at test time and kept out of the module tree, so that neither the
        # optimiser, DDP nor the checkpoint ever see it
        self._probe: Unregistered[LinearProbe] = Unregistered()
        self._probe_train_acc = float("nan")

    @property
    def probe(self) -> LinearProbe:
        if self._probe.value is None:
            raise RuntimeError("the linear probe is fitted at the start of `ue test`; run the test loop first")
        return self._probe.value

    def forward(self, x: Tensor) -> Tensor:
        """Encoder features (B, feature_dim) of images (B, C, H, W) in [0, 1]."""
        return self.net.features(x)

    def _view(self, x: Tensor) -> Tensor:
        h = self.hparams
        return simclr_views(x, h.image_size, crop_scale=h.crop_scale, flip_p=h.flip_p)

    def training_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> Tensor | None:
        x = batch[0]
        if len(x) < 2:  # BatchNorm1d and NT-Xent need two samples
            return None
        with torch.no_grad():
            v1, v2 = self._view(x), self._view(x)
        self.net.before_step()
        loss = self.net.loss(v1, v2)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(x))
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        self.net.after_step(self.all_gather)  # MoCo: this step's keys into the queue (after the optimiser step)

    # ------------------------------------------------------------------ linear probe
    @torch.no_grad()
    def extract_features(self, dataset: Dataset) -> tuple[Tensor, Tensor]:
        """Encoder features (N, D) and labels (N,) of ``dataset`` in index order, sharded over ranks."""
        dm, trainer = self.trainer.datamodule, self.trainer
        sampler = (DistributedSampler(dataset, num_replicas=trainer.world_size, rank=trainer.global_rank, shuffle=False)
                   if trainer.world_size > 1 else None)
        loader = DataLoader(dataset, batch_size=dm.eval_batch_size, sampler=sampler, num_workers=dm.num_workers)
        feats, labels, index = [], [], []
        with in_mode(self.net, False):
            for x, y, i in progress(loader, desc="probe: features", trainer=trainer):
                feats.append(self.net.features(x.to(self.device)))
                labels.append(y.to(self.device))
                index.append(i.to(self.device))
        feats, labels, index = torch.cat(feats), torch.cat(labels), torch.cat(index)
        if trainer.world_size > 1:  # equal shards (the sampler pads), so one gather; padding repeats dropped
            feats, labels, index = (self.all_gather(t).flatten(0, 1) for t in (feats, labels, index))
        keep = first_occurrences(index)
        order = torch.argsort(index[keep])  # index order, whatever the sharding
        return feats[keep][order], labels[keep][order]

    def on_test_start(self) -> None:
        with torch.inference_mode(False):
            dataset = probe_train_set(self.trainer.datamodule, protected=self.probe_data == "protected")
            feats, labels = self.extract_features(dataset)
            with progress(desc="probe: L-BFGS", total=probe_evaluations(self.probe_steps), unit="evaluation",
                          trainer=self.trainer) as bar:
                self._probe.value = fit_linear_probe(feats, labels, self.hparams.num_classes,
                                                     steps=self.probe_steps, weight_decay=self.probe_weight_decay,
                                                     on_evaluation=bar.update)
            self._probe_train_acc = float((self.probe(feats).argmax(1) == labels).float().mean())

    def test_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> None:
        x, y, _ = batch
        self.net.eval()
        self.test_acc(self.probe(self.net.features(x)), y)
        self.log("test/acc", self.test_acc, on_epoch=True)

    def on_test_epoch_end(self) -> None:
        self.log("test/probe_train_acc", self._probe_train_acc)

    def configure_optimizers(self):
        h = self.hparams
        return learner_optimizer(h.method, [p for p in self.net.parameters() if p.requires_grad], h.lr,
                                 h.weight_decay)


class SimCLRVictim(ContrastiveVictim):
    """:class:`ContrastiveVictim` under its former name (``method`` simclr by default), so that configs and
    checkpoints that name it keep working."""
