"""The three contrastive learners TUE names (Ren et al., ICLR 2023): SimCLR, MoCo and SimSiam.

Each is an ``nn.Module`` around an encoder of the zoo (:func:`~ue_lightning.models.build_classifier`
without its head) with one interface, shared by the TUE generator (its surrogate) and the unsupervised
victim:

* ``features(x)``: images (B, C, H, W) in [0, 1] -> representations (B, feature_dim), what a linear
  probe reads;
* ``loss(v1, v2, key_gradient=False)``: the learner's loss of two views of a batch (a scalar). With
  ``key_gradient`` the gradient also flows through the branch the method stops it in (MoCo's keys,
  SimSiam's targets): the reference's ``k_grad`` option for noise;
* ``before_step()`` and ``after_step(gather)``: MoCo's momentum update of the key encoder (before each
  optimiser step's forward) and its queue update with the keys of the last training loss, gathered
  over ranks by ``gather`` (``LightningModule.all_gather``) so that every rank holds the same queue.

Settings from TUE's code (renjie3/TUE): SimCLR a 128-d projection, NT-Xent at temperature 0.5, Adam
1e-3; MoCo a 128-d linear projection, a queue of 4096 keys, momentum 0.99, temperature 0.1, the
symmetric loss (its demo command: asymmetric, temperature 0.2), SGD 0.3; SimSiam (CIFAR) a 2-layer 2048-d projector and a 2048-512-2048 predictor,
negative cosine with stop-gradient, SGD 0.06. Departures (ours): MoCo's shuffle-BN and split
BatchNorm are left out (under DDP each rank's BatchNorm sees its own shard, as split BatchNorm
simulates), and the queue is updated by training steps only, not by noise steps.
"""

from __future__ import annotations

import copy
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ue_lightning.models.registry import build_classifier
from ue_lightning.modules.simclr import ProjectionHead, nt_xent

ContrastiveMethod = Literal["simclr", "moco", "simsiam"]
#: ``all_gather`` of a LightningModule: a tensor (B, D) -> (world_size, B, D), or (B, D) on one process.
Gather = Callable[[Tensor], Tensor]


def _encoder(arch: str, in_channels: int, image_size: int, width: int | None) -> nn.Module:
    encoder = build_classifier(arch, num_classes=1, in_channels=in_channels, image_size=image_size, width=width)
    encoder.head = nn.Identity()  # replaced by the learner's heads; an unused head would upset DDP
    return encoder


class ContrastiveLearner(nn.Module):
    """An encoder with a contrastive loss; see the module docstring for the interface."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.feature_dim: int = encoder.feature_dim

    def features(self, x: Tensor) -> Tensor:
        return self.encoder.forward_features(x)

    def loss(self, v1: Tensor, v2: Tensor, key_gradient: bool = False) -> Tensor:
        raise NotImplementedError

    def before_step(self) -> None:
        """Called before each training step's forward pass."""

    def after_step(self, gather: Gather) -> None:
        """Called after each training step's optimiser step."""


class SimCLR(ContrastiveLearner):
    """SimCLR: projection ``Linear-BN-ReLU-Linear`` to ``proj_dim``, NT-Xent over the batch's 2B views."""

    def __init__(self, encoder: nn.Module, proj_dim: int = 128, temperature: float = 0.5):
        super().__init__(encoder)
        self.projection = ProjectionHead(self.feature_dim, proj_dim)
        self.temperature = temperature

    def forward(self, x: Tensor) -> Tensor:
        """Projections (B, proj_dim)."""
        return self.projection(self.features(x))

    def loss(self, v1: Tensor, v2: Tensor, key_gradient: bool = False) -> Tensor:
        return nt_xent(self(v1), self(v2), self.temperature)


class MoCo(ContrastiveLearner):
    """MoCo: a query encoder and projection, their momentum copy for keys, a queue of past keys.

    The first view's query is scored against the second view's key (its positive) and the ``queue_size``
    keys of the queue (negatives), at ``temperature``; ``symmetric``: the other direction's cross-entropy
    is added, and both views' keys are queued (else the second view's).
    """

    def __init__(self, encoder: nn.Module, proj_dim: int = 128, queue_size: int = 4096, momentum: float = 0.99,
                 temperature: float = 0.1, symmetric: bool = True, seed: int = 0):
        super().__init__(encoder)
        if queue_size < 1 or not 0.0 <= momentum < 1.0:
            raise ValueError(f"queue_size={queue_size} must be positive and momentum={momentum} in [0, 1)")
        self.projection = nn.Linear(self.feature_dim, proj_dim)
        self.key_encoder = copy.deepcopy(encoder).requires_grad_(False)
        self.key_projection = copy.deepcopy(self.projection).requires_grad_(False)
        self.momentum, self.temperature, self.symmetric = momentum, temperature, symmetric
        start = torch.randn(queue_size, proj_dim, generator=torch.Generator().manual_seed(seed))
        self.register_buffer("queue", F.normalize(start, dim=1))  # (K, proj_dim), unit rows
        self.register_buffer("queue_next", torch.zeros((), dtype=torch.long))  # where the next key goes
        self._last_keys: Tensor | None = None

    def query(self, x: Tensor) -> Tensor:
        return F.normalize(self.projection(self.features(x)), dim=1)

    def key(self, x: Tensor) -> Tensor:
        return F.normalize(self.key_projection(self.key_encoder.forward_features(x)), dim=1)

    def _one_way(self, q: Tensor, k: Tensor) -> Tensor:
        positive = (q * k).sum(1, keepdim=True)  # (B, 1)
        negative = q @ self.queue.detach().T  # (B, K)
        logits = torch.cat([positive, negative], dim=1) / self.temperature
        return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=q.device))

    def loss(self, v1: Tensor, v2: Tensor, key_gradient: bool = False) -> Tensor:
        with torch.set_grad_enabled(key_gradient and torch.is_grad_enabled()):
            k2 = self.key(v2)
            k1 = self.key(v1) if self.symmetric else None
        loss = self._one_way(self.query(v1), k2)
        if self.symmetric:
            loss = loss + self._one_way(self.query(v2), k1)
        if self.training:
            self._last_keys = (torch.cat([k1, k2]) if self.symmetric else k2).detach()
        return loss

    @torch.no_grad()
    def before_step(self) -> None:
        """The key encoder and projection move towards the query ones: ``k <- m k + (1 - m) q``."""
        pairs = ((self.encoder, self.key_encoder), (self.projection, self.key_projection))
        for query, key in pairs:
            for q, k in zip(query.parameters(), key.parameters()):  # (BatchNorm statistics: each its own)
                k.mul_(self.momentum).add_(q.detach(), alpha=1 - self.momentum)

    @torch.no_grad()
    def after_step(self, gather: Gather) -> None:
        """The last training loss's keys of every rank (in rank order) replace the oldest ones in the queue."""
        if self._last_keys is None:
            return
        keys = gather(self._last_keys)
        keys = keys.reshape(-1, keys.shape[-1])[-len(self.queue):]
        slots = (self.queue_next + torch.arange(len(keys), device=keys.device)) % len(self.queue)
        self.queue[slots] = keys.to(self.queue.dtype)
        self.queue_next.copy_((self.queue_next + len(keys)) % len(self.queue))
        self._last_keys = None


class SimSiam(ContrastiveLearner):
    """SimSiam: projector ``Linear-BN-ReLU-Linear-BN`` to ``proj_dim``, predictor ``proj_dim -> proj_dim // 4 ->
    proj_dim``; the loss is minus the mean cosine of each view's prediction with the other's projection, the
    projection's gradient stopped (unless ``key_gradient``)."""

    def __init__(self, encoder: nn.Module, proj_dim: int = 2048):
        super().__init__(encoder)
        d, hidden = self.feature_dim, max(1, proj_dim // 4)
        self.projection = nn.Sequential(nn.Linear(d, proj_dim), nn.BatchNorm1d(proj_dim), nn.ReLU(inplace=True),
                                        nn.Linear(proj_dim, proj_dim), nn.BatchNorm1d(proj_dim))
        self.predictor = nn.Sequential(nn.Linear(proj_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                                       nn.Linear(hidden, proj_dim))

    def loss(self, v1: Tensor, v2: Tensor, key_gradient: bool = False) -> Tensor:
        z1, z2 = self.projection(self.features(v1)), self.projection(self.features(v2))
        p1, p2 = self.predictor(z1), self.predictor(z2)
        if not key_gradient:
            z1, z2 = z1.detach(), z2.detach()
        return -0.5 * (F.cosine_similarity(p1, z2).mean() + F.cosine_similarity(p2, z1).mean())


def build_learner(method: ContrastiveMethod, arch: str = "resnet18", in_channels: int = 3, image_size: int = 32,
                  width: int | None = None, proj_dim: int | None = None, temperature: float | None = None,
                  queue_size: int = 4096, momentum: float = 0.99, symmetric: bool = True,
                  seed: int = 0) -> ContrastiveLearner:
    """The learner ``method`` on a fresh encoder; ``proj_dim`` and ``temperature`` None: the method's own (SimCLR
    128 and 0.5, MoCo 128 and 0.1, SimSiam 2048)."""
    encoder = _encoder(arch, in_channels, image_size, width)
    if method == "simclr":
        return SimCLR(encoder, proj_dim or 128, 0.5 if temperature is None else temperature)
    if method == "moco":
        return MoCo(encoder, proj_dim or 128, queue_size, momentum, 0.1 if temperature is None else temperature,
                    symmetric, seed)
    if method == "simsiam":
        return SimSiam(encoder, proj_dim or 2048)
    raise ValueError(f"method={method!r}: choose simclr, moco or simsiam")


def learner_optimizer(method: ContrastiveMethod, params, lr: float | None = None,
                      weight_decay: float | None = None) -> torch.optim.Optimizer:
    """TUE's optimiser of each learner (None: its rate and weight decay): SimCLR Adam 1e-3 (1e-6), MoCo SGD 0.3
    (1e-4, momentum 0.9), SimSiam SGD 0.06 (5e-4, momentum 0.9)."""
    if method == "simclr":
        return torch.optim.Adam(params, lr=lr or 1e-3, weight_decay=1e-6 if weight_decay is None else weight_decay)
    defaults = {"moco": (0.3, 1e-4), "simsiam": (0.06, 5e-4)}[method]
    return torch.optim.SGD(params, lr=lr or defaults[0], momentum=0.9,
                           weight_decay=defaults[1] if weight_decay is None else weight_decay)
