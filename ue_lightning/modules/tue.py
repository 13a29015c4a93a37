"""TransferableNoise: Transferable Unlearnable Examples (Ren et al., ICLR 2023).

Sample-wise noise optimised against a contrastive encoder (``backbone``: SimCLR, MoCo or
SimSiam, :mod:`~ue_lightning.modules.contrastive`) plus the Classwise Separability
Discriminant (CSD) of the noise itself:

    min_delta  ssl_weight * L_ssl(view1(x + delta), view2(x + delta))
               + csd_weight * CSD(delta, y)          subject to |delta| <= epsilon

(L_ssl: SimCLR's NT-Xent, MoCo's InfoNCE against its queue, SimSiam's negative cosine.)
The loop follows the reference (``ssl_perturbation.py::sample_wise_perturbation``): the
surrogate is trained on x + delta (its own optimiser), and every ``train_steps`` of its
batches the noise of the whole train set is updated by ``steps`` PGD sign steps, on a
shuffled pass (the CSD needs several classes per batch), the encoder in eval mode.
There is no stopping rule: the trainer's ``max_epochs`` (40 in the paper) ends it.
The public SimCLR demo uses ``ssl_weight=0, csd_weight=0.1`` (the noise is then shaped
by the CSD alone); ``ssl_weight=1, csd_weight=1`` is the combined objective.
"""

from __future__ import annotations

import itertools
from typing import Any, Literal, Sequence

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms.v2 import functional as TF

from ue_lightning.ops.attacks import budget_to_pixels, pgd_minimize, project_linf
from ue_lightning.ops.augment import random_crop_flip
from ue_lightning.console import progress
from ue_lightning.models.batchnorm import in_mode
from ue_lightning.models.checkpoint import CheckpointError, load_weights, read_lightning_checkpoint
from ue_lightning.modules.generator_base import StoredNoiseGenerator
from ue_lightning.modules.contrastive import ContrastiveMethod, build_learner, learner_optimizer
from ue_lightning.modules.simclr import classwise_separability, simclr_views
from ue_lightning.modules.noise_store import CHUNK_BYTES, StoreKind
from ue_lightning.ops.sample_rng import salt_of


class TransferableNoise(StoredNoiseGenerator):
    """TUE noise generator (sample-wise), method ``tue``.

    The noise state (N, C, H, W) in pixel units covers the whole train split at its
    stored size (see :class:`~ue_lightning.modules.generator_base.StoredNoiseGenerator`:
    the store, the checkpoint key ``transferable_noise``, the data fingerprint), so
    ``ue fit --ckpt_path`` resumes it and ``ue predict --ckpt_path`` writes it.

    Args:
        arch: surrogate encoder (CIFAR ResNet-18 in the paper).
        backbone: the contrastive learner: ``simclr`` (the public demo), ``moco`` or ``simsiam`` (TUE's other two;
            their heads, losses and optimisers: :mod:`~ue_lightning.modules.contrastive`).
        width: encoder width (None: the architecture's standard width).
        num_classes: number of classes (linked from the DataModule by the CLI).
        in_channels: image channels (linked from the DataModule by the CLI).
        image_size: side of the model's input in pixels (linked from the DataModule by the CLI).
        epsilon: L-infinity budget in 1/255 units (8).
        step_size: PGD step in 1/255 units (0.8).
        steps: PGD steps per noise batch in each noise pass (20).
        train_steps: SimCLR batches between two full noise passes (20).
        ssl_weight: weight of the NT-Xent term of the noise loss (public SimCLR demo: 0; combined: 1).
        csd_weight: weight of the CSD term of the noise loss (public SimCLR demo: 0.1; combined: 1).
        detach_spread: CSD spreads as constants (the reference), see
            :func:`~ue_lightning.modules.simclr.classwise_separability`.
        eot_size: augmentation draws averaged in the SSL term of the noise loss (1).
        csd_views: 0 (the paper): the CSD scores the noise as it is. n > 0: the CSD is averaged over
            n random crop (``csd_view_padding``) and flip (when ``flip_p > 0``) views of the noise,
            drawn anew at every PGD step, so only class patterns that survive a victim's crop + flip
            keep their classes apart (ours; docs/methods.md and docs/cpu-scale.md say why and when).
        csd_view_padding: crop padding of those views in pixels (None: ``image_size // 8``, CIFAR's 4).
        random_start: start the noise uniformly in [-epsilon, epsilon] (the demo), else at 0.
        noise_batch_size: batch of the noise pass (None: the DataModule's batch size, 512 in the paper).
        proj_dim: output size of the projection head (None: the backbone's, SimCLR and MoCo 128, SimSiam 2048).
        temperature: contrastive temperature (None: SimCLR 0.5, MoCo 0.1; SimSiam has none).
        key_gradient: with ``moco`` or ``simsiam``, the noise's gradient also flows through the keys' (targets')
            branch, the reference's ``--k_grad`` (off by default, as there).
        queue_size: MoCo's queue of negative keys (4096).
        momentum: MoCo's key-encoder momentum (0.99).
        symmetric: MoCo's symmetric loss, both views as queries (True; TUE's MoCo demo: False).
        lr: learning rate of the surrogate (None: SimCLR Adam 1e-3, MoCo SGD 0.3, SimSiam SGD 0.06).
        weight_decay: weight decay of the surrogate (None: SimCLR 1e-6, MoCo 1e-4, SimSiam 5e-4).
        crop_scale: SimCLR view random-resized-crop scale range (colour jitter
            0.4/0.4/0.4/0.1 with p 0.8 and grayscale p 0.2 are fixed).
        flip_p: SimCLR view horizontal-flip probability.
        skip_idle_surrogate: with ``ssl_weight == 0`` the encoder cannot change the noise,
            so its SimCLR updates are skipped (the optimiser still steps, a no-op, so the
            step count and ``max_steps`` behave); set False to spend that compute as the
            reference does.
        noise_dtype, noise_store, noise_store_dir: how the noise state is stored, see
            :class:`~ue_lightning.modules.generator_base.StoredNoiseGenerator`.
        seed: seeds the random start and the noise-pass shuffling.
        surrogate_checkpoint: a TransferableNoise checkpoint fitted on other data (data A): its contrastive learner
            (encoder, heads, MoCo's queue) replaces the fresh one when this fit starts, and the noise is made for
            this run's data (B): noise for B from a surrogate fitted on A, TUE's transfer across datasets. Its
            ``backbone``, ``arch``, ``width``, ``in_channels`` and ``proj_dim`` must be this run's; A's noise is not
            read. None: a fresh learner. With the public demo's ``ssl_weight`` 0 the learner plays no part in
            the noise (the CSD alone shapes it): use ``ssl_weight`` > 0.
        surrogate_frozen: with ``surrogate_checkpoint``, the learner stays as fitted on A and only the noise
            passes run (the default); False: it goes on training on B's protected images, as a fresh one would.
        state_dtype: the former name of ``noise_dtype``, which it replaces when given: only so
            that checkpoints written under that name (their settings come with them) load.
    """

    method = "tue"
    checkpoint_key = "transferable_noise"
    no_noise_message = ("this checkpoint holds no TUE noise state: pass a checkpoint written by "
                        "`ue fit` with ue_lightning.modules.TransferableNoise")

    def __init__(
        self,
        arch: str = "resnet18",
        backbone: ContrastiveMethod = "simclr",
        num_classes: int = 10,
        in_channels: int = 3,
        image_size: int = 32,
        width: int | None = None,
        epsilon: float = 8.0,
        step_size: float = 0.8,
        steps: int = 20,
        train_steps: int = 20,
        ssl_weight: float = 0.0,
        csd_weight: float = 0.1,
        detach_spread: bool = True,
        eot_size: int = 1,
        csd_views: int = 0,
        csd_view_padding: int | None = None,
        random_start: bool = True,
        noise_batch_size: int | None = None,
        temperature: float | None = None,
        proj_dim: int | None = None,
        key_gradient: bool = False,
        queue_size: int = 4096,
        momentum: float = 0.99,
        symmetric: bool = True,
        lr: float | None = None,
        weight_decay: float | None = None,
        crop_scale: Sequence[float] = (0.08, 1.0),
        flip_p: float = 0.5,
        skip_idle_surrogate: bool = True,
        noise_dtype: Literal["float32", "float16"] = "float32",
        noise_store: StoreKind = "auto",
        noise_store_dir: str | None = None,
        seed: int = 0,
        surrogate_checkpoint: str | None = None,
        surrogate_frozen: bool = True,
        state_dtype: Literal["float32", "float16"] | None = None,
    ):
        super().__init__(epsilon=epsilon, seed=seed, noise_dtype=state_dtype or noise_dtype, noise_store=noise_store,
                         noise_store_dir=noise_store_dir)
        self.save_hyperparameters()
        if ssl_weight < 0 or csd_weight < 0 or ssl_weight + csd_weight == 0:
            raise ValueError(f"ssl_weight={ssl_weight}, csd_weight={csd_weight}: both must be >= 0 and one > 0 "
                             "(public demo: ssl_weight 0, csd_weight 0.1)")
        if steps < 1 or train_steps < 1 or eot_size < 1:
            raise ValueError(f"steps={steps}, train_steps={train_steps}, eot_size={eot_size} must be positive")
        if csd_views < 0 or (csd_view_padding is not None and csd_view_padding < 0):
            raise ValueError(f"csd_views={csd_views}, csd_view_padding={csd_view_padding} must be >= 0 "
                             "(csd_views 0: the CSD of the noise itself, as the paper)")
        self.csd_view_padding = image_size // 8 if csd_view_padding is None else int(csd_view_padding)
        self.step_size_px = budget_to_pixels(step_size, "step_size", allow_zero=False)
        self.automatic_optimization = False
        self.net = build_learner(backbone, arch, in_channels, image_size, width, proj_dim, temperature, queue_size,
                                 momentum, symmetric, seed)
        self.noise_passes = 0
        self._last_pass_step = -1
        self._noise_set: Dataset | None = None

    # ------------------------------------------------------------------ state
    def _fill_initial(self, noise: Tensor) -> None:
        """The random start, uniform in [-epsilon, epsilon] (the same on every rank), in blocks of rows."""
        if not self.hparams.random_start:
            return
        g = torch.Generator().manual_seed(self.seed)
        step = max(1, CHUNK_BYTES // (noise[:1].numel() * 4))
        for start in range(0, len(noise), step):  # the draws of one torch.rand over the whole shape, in order
            block = torch.rand((len(noise[start:start + step]), *noise.shape[1:]), generator=g)
            noise[start:start + step] = ((2 * block - 1) * self.radius_px).to(noise.dtype)

    def _initial_noise(self, shape: tuple[int, ...]) -> Tensor:
        noise = torch.zeros(shape, dtype=self.noise_dtype)
        self._fill_initial(noise)
        return noise

    def setup(self, stage: str) -> None:
        dm = self.trainer.datamodule
        if dm is None or not hasattr(dm, "stored_image_shape"):
            raise TypeError("TransferableNoise needs the UEDataModule (it reads the train split's size and shape)")
        if stage == "fit":
            if dm.augment:
                raise ValueError("TransferableNoise optimises noise on the clean, unaugmented train set: "
                                 "set `data.augment: false`")
            if dm.perturbation is not None:
                raise ValueError("TransferableNoise generates noise for clean data: unset `data.perturbation`")
            self._noise_set = dm.train_images()
            if self.hparams.surrogate_checkpoint is not None:
                self._load_surrogate(self.hparams.surrogate_checkpoint)  # a resumed fit's own state then replaces it
        super().setup(stage)

    #: The settings a learner's weights must share with this module's to be loaded into it.
    LEARNER_SETTINGS = ("backbone", "arch", "width", "in_channels", "proj_dim")

    def _load_surrogate(self, path: str) -> None:
        """The contrastive learner of the TransferableNoise checkpoint ``path`` (fitted on other data) into ``self.net``."""
        fix = ("give the last.ckpt of a `ue fit` of ue_lightning.modules.TransferableNoise with this run's backbone, "
               "arch, width, in_channels and proj_dim")
        hp, state = read_lightning_checkpoint(path, name="surrogate_checkpoint", expected="TransferableNoise",
                                              fix=fix, prefix="net.", required=("backbone",))
        ours = {k: self.hparams.get(k) for k in self.LEARNER_SETTINGS}
        differ = [f"{k}={hp.get(k)!r} there, {v!r} here" for k, v in ours.items() if hp.get(k) != v]
        if differ:
            raise CheckpointError(f"surrogate_checkpoint {path} holds another learner ({'; '.join(differ)}): {fix}")
        weights = {k[len("net."):]: v for k, v in state.items() if k.startswith("net.")}
        load_weights(self.net, weights, name=f"surrogate_checkpoint {path}", what=f"the {hp['backbone']} learner",
                     fix=fix)

    def _extra_state(self) -> dict[str, Any]:
        return {"noise_passes": self.noise_passes}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self.noise_passes = int(state["noise_passes"])

    def on_predict_start(self) -> None:
        if self.noise_passes > 0:  # with none, the noise is the random start everywhere
            self._check_covers(self.trainer.datamodule.train_indices())

    def _noise_for(self, index: Tensor, size: int | None = None) -> Tensor:
        """Stored noise of ``index`` (CPU), centre-cropped to ``size`` (what CenterCrop did to the image)."""
        noise = self.noise[index.cpu()]
        return noise if size is None else TF.center_crop(noise, [size, size])

    # ------------------------------------------------------------------ surrogate (the contrastive learner)
    def _view(self, x: Tensor) -> Tensor:
        h = self.hparams
        return simclr_views(x, h.image_size, crop_scale=h.crop_scale, flip_p=h.flip_p)

    def _ssl_loss(self, x: Tensor) -> Tensor:
        return self.net.loss(self._view(x), self._view(x), key_gradient=self.hparams.key_gradient)

    @property
    def _trains_surrogate(self) -> bool:
        h = self.hparams
        if h.get("surrogate_checkpoint") is not None and h.get("surrogate_frozen", True):
            return False  # the learner fitted on other data stays as it is
        return h.ssl_weight > 0 or not h.skip_idle_surrogate

    def training_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> None:
        x, _, index = batch
        opt = self.optimizers()
        if self._trains_surrogate and len(x) > 1:  # BatchNorm1d and NT-Xent need two samples
            protected = (x + self._noise_for(index, x.shape[-1]).to(x)).clamp(0, 1)
            self.net.before_step()
            loss = self._ssl_loss(protected)
            opt.zero_grad()
            self.manual_backward(loss)
            self.log("train/ssl_loss", loss, prog_bar=True, batch_size=len(x))
            opt.step()
            self.net.after_step(self.all_gather)
        else:
            opt.step()  # without gradients a no-op on the weights; advances global_step

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = self.global_step
        if step > 0 and step % self.hparams.train_steps == 0 and step != self._last_pass_step:
            self._last_pass_step = step
            self.noise_pass()

    # ------------------------------------------------------------------ noise
    def csd_loss(self, delta: Tensor, y: Tensor, index: Tensor | None = None, draw: int = 0) -> Tensor:
        """The CSD of a batch of noise (pixel units, (B, C, H, W)), or its mean over ``csd_views`` crop/flip views.

        The views of sample ``index[b]`` are a pure function of (seed, index, noise pass, ``draw``, view).
        """
        h = self.hparams
        if h.csd_views == 0:
            return classwise_separability(delta, y, detach_spread=h.detach_spread)
        if index is None:
            raise ValueError("csd_views > 0 needs the samples' indices (their views are drawn per sample)")
        total = delta.new_zeros(())
        for view in range(h.csd_views):
            salt = salt_of("csd-view", self.noise_passes, draw, view)
            seen = random_crop_flip(delta, self.csd_view_padding, h.flip_p > 0, index=index, seed=self.seed, salt=salt)
            total = total + classwise_separability(seen, y, detach_spread=h.detach_spread)
        return total / h.csd_views

    def noise_objective(self, x: Tensor, y: Tensor, index: Tensor | None = None):
        """Loss callable for PGD: ``ssl_weight * NT-Xent + csd_weight * CSD`` at a perturbed batch.

        Each call is one PGD step: with ``csd_views`` it draws that step's views.
        """
        h = self.hparams
        draws = itertools.count()  # the PGD step: each call of the loss is one

        def loss(perturbed: Tensor) -> Tensor:
            total = perturbed.new_zeros(())
            if h.csd_weight > 0:
                total = total + h.csd_weight * self.csd_loss(perturbed - x, y, index, next(draws))
            if h.ssl_weight > 0:
                for _ in range(h.eot_size):
                    total = total + h.ssl_weight * self._ssl_loss(perturbed) / h.eot_size
            return total

        return loss

    def _noise_loader(self) -> DataLoader:
        batch_size = self.hparams.noise_batch_size or self.trainer.datamodule.batch_size
        return self._sharded_loader(self._noise_set, batch_size, shuffle=True, epoch=self.noise_passes)

    def noise_pass(self) -> None:
        """Update the noise of every train sample (PGD descent, warm start), sharded over ranks."""
        h = self.hparams
        csd_sum, batches = 0.0, 0
        with in_mode(self.net, False):
            for x, y, index in progress(self._noise_loader(), desc=f"TUE noise pass {self.noise_passes + 1}",
                                        trainer=self.trainer):
                x, y = x.to(self.device), y.to(self.device)
                objective = self.noise_objective(x, y, index.to(self.device))
                delta = pgd_minimize(objective, x, radius=self.radius_px, step_size=self.step_size_px,
                                     steps=h.steps, init=self._noise_for(index).to(x))
                with torch.no_grad():
                    csd_sum += float(classwise_separability(delta, y))
                batches += 1
                self._store_batch(index, delta)  # every rank's shard, the padding's repeats in a batch dropped
        self.noise_passes += 1
        self._check_ranks_agree(f"after noise pass {self.noise_passes}")
        self.log("noise/csd", csd_sum / max(1, batches), prog_bar=True, sync_dist=True)
        self.log("noise/passes", float(self.noise_passes))

    def on_train_end(self) -> None:
        if self.noise_passes == 0:
            rank_zero_warn(f"TransferableNoise ran no noise pass: training stopped before {self.hparams.train_steps} "
                           "batches (train_steps); the noise is still its random start")

    def generate(self, x: Tensor, y: Tensor, index: Tensor) -> Tensor:
        if not self._has_noise:
            raise RuntimeError("TransferableNoise has no noise: train it with `ue fit` and pass that checkpoint "
                               "to `ue predict --ckpt_path`")
        if tuple(self.noise.shape[1:]) != tuple(x.shape[1:]) or int(index.max()) >= len(self.noise):
            raise ValueError(f"noise state {tuple(self.noise.shape)} does not fit batch {tuple(x.shape)} "
                             f"(max index {int(index.max())}): predict on the data the noise was made for")
        return project_linf(self._noise_for(index).to(x), x, self.radius_px)

    def configure_optimizers(self):
        h = self.hparams
        return learner_optimizer(h.backbone, [p for p in self.net.parameters() if p.requires_grad], h.lr,
                                 h.weight_decay)
