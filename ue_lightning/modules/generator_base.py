"""What every noise generator shares (how `ue predict` turns its noise into a noise file), and stored noise."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any, Callable, Literal

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler

from ue_lightning.ops.attacks import budget_to_pixels
from ue_lightning.callbacks import log_perturbation_grid, tensorboard_loggers
from ue_lightning.data.delta import quantize_delta
from ue_lightning.modules.noise_store import NoiseStore, StoreKind, choose_kind, stream_checkpoints
from ue_lightning.ops.shard_duplicates import first_occurrences, first_unseen


def to_uint8(x: Tensor) -> Tensor:
    """The uint8 image (0-255) behind a float image that the DataModule made from it."""
    return (x * 255.0).round().clamp(0, 255).to(torch.uint8)


def round_to_pixel_grid(x: Tensor) -> Tensor:
    """Images in [0, 1] rounded to the 1/255 grid (what a uint8 protected image stores), in ``x``'s dtype."""
    return to_uint8(x).to(x.dtype) / 255.0


class NoiseGenerator(L.LightningModule):
    """Base class of the noise generators.

    Subclasses implement :meth:`generate` (float delta in pixel units for a clean batch)
    and set ``method`` and ``epsilon``. ``predict_step`` rounds that delta against the
    clean uint8 image, so ``PerturbationWriter`` writes exactly ``protected - clean``.
    Class-wise generators set ``classwise = True`` and implement :meth:`class_delta`.
    """

    method: str = "noise"
    classwise: bool = False

    def __init__(self, epsilon: float = 8.0, seed: int = 0):
        super().__init__()
        self.epsilon = float(epsilon)  # 1/255 units, as in configs and noise files
        self.radius_px = budget_to_pixels(epsilon, "epsilon", allow_zero=False)  # pixel units
        self.seed = int(seed)

    def generate(self, x: Tensor, y: Tensor, index: Tensor) -> Tensor:
        """delta (B, C, H, W) in pixel units, |delta| <= radius, x + delta in [0, 1]."""
        raise NotImplementedError

    def class_delta(self) -> Tensor:
        """Class-wise generators: int8 (K, C, H, W) in 1/255 units."""
        raise NotImplementedError

    def predict_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> dict[str, Tensor]:
        x, y, index = batch
        if self.classwise:
            return {"index": index}
        delta = self.generate(x, y, index)
        return {"index": index.cpu(), "delta": quantize_delta(to_uint8(x), delta, self.epsilon).cpu()}

    def on_predict_batch_end(self, outputs: dict[str, Tensor], batch: tuple[Tensor, Tensor, Tensor], batch_idx: int,
                             dataloader_idx: int = 0) -> None:
        """The first batch's ``clean | noise | protected`` grid goes to TensorBoard, when a TensorBoardLogger is set."""
        if batch_idx != 0 or not self.trainer.is_global_zero or not tensorboard_loggers(self.loggers):
            return
        x, y, _ = batch
        delta = self.class_delta()[y.cpu()] if self.classwise else outputs["delta"]
        log_perturbation_grid(self.loggers, to_uint8(x), delta, self.epsilon, self.global_step)

    def noise_metadata(self) -> dict[str, Any]:
        """Method, budget and config for the noise file (see NoiseMetadata)."""
        config = {k: v for k, v in dict(self.hparams).items() if isinstance(v, (int, float, str, bool, list, tuple, type(None)))}
        return {"method": self.method, "epsilon": self.epsilon, "config": config}


NOISE_DTYPES = {"float32": torch.float32, "float16": torch.float16}


class StoredNoiseGenerator(NoiseGenerator):
    """Base class of the generators whose noise is state that passes over the train set update (EM, TUE).

    The noise is (R, C, H, W) in pixel units, R = the train split's N samples (sample-wise; the
    whole split at its stored size, indexed by sample) or K classes (class-wise), on the CPU,
    in a :class:`~ue_lightning.modules.noise_store.NoiseStore` (in memory or a node-shared memory-mapped
    file). It is not a registered buffer: DDP would broadcast it at every step; ranks instead
    stay identical by gathering every update (:meth:`_store_batch`).

    What this class does for its subclasses: create the store in ``setup`` (subclasses give its
    rows with :meth:`noise_rows` and its start with :meth:`_fill_initial`), check the data's
    fingerprint against the noise's, save and restore the noise under ``checkpoint_key``
    (with ``covered``, the fingerprint and the subclass's :meth:`_extra_state`), build the
    sharded loader of a pass, gather a pass's batch, drop the sampler's padded repeats, write
    it, and check that the ranks' copies agree.

    Args:
        noise_dtype: storage of the noise in pixel units: ``float32`` (exact; CIFAR-10
            sample-wise 614 MB) or ``float16`` (half; spacing about 0.004/255 near 8/255, far
            below the 1/255 rounding of the noise file).
        noise_store: where the noise lives: ``memory`` (a tensor in each process: one copy per
            DDP rank), ``file`` (a file memory-mapped by every rank of a node: one copy per
            node, in the page cache, which the kernel can write back to disk) or ``auto``
            (``file`` from 1 GiB of noise, N x C x H x W x 4 or 2 bytes; class-wise noise is
            always in memory).
        noise_store_dir: folder of the ``file`` store (None: the trainer's ``default_root_dir``);
            best a node-local disk, not tmpfs (whose pages cannot be written back).
    """

    checkpoint_key: str = "stored_noise"
    no_noise_message: str = "this checkpoint holds no noise of this generator: pass the checkpoint of its fit"

    def __init__(self, epsilon: float = 8.0, seed: int = 0, noise_dtype: Literal["float32", "float16"] = "float32",
                 noise_store: StoreKind = "auto", noise_store_dir: str | None = None):
        super().__init__(epsilon=epsilon, seed=seed)
        if noise_dtype not in NOISE_DTYPES:
            raise ValueError(f"noise_dtype={noise_dtype!r}: choose one of {', '.join(NOISE_DTYPES)}")
        choose_kind(noise_store, (1,), torch.float32)  # checks the name
        self.noise_dtype = NOISE_DTYPES[noise_dtype]
        self.noise_store, self.noise_store_dir = noise_store, noise_store_dir
        self._store: NoiseStore | None = None
        self.covered: Tensor | None = None  # bool (N,): samples a pass has updated (None: not recorded)
        self._fingerprint: dict[str, Any] | None = None  # of the data the noise belongs to
        self._has_noise = False  # started by a fit, or restored from a checkpoint

    @property
    def noise(self) -> Tensor | None:
        """The whole noise (R, C, H, W), pixel units, CPU (a memory map with the file store)."""
        return None if self._store is None else self._store.tensor

    @noise.setter
    def noise(self, value: Tensor) -> None:
        self._store = NoiseStore(value)
        self._has_noise = True

    # ------------------------------------------------------------------ to override
    def noise_rows(self) -> int:
        """R: the train split's size (sample-wise) or its number of classes (class-wise)."""
        return self.trainer.datamodule.num_train_samples

    def _fill_initial(self, noise: Tensor) -> None:
        """Write the start of a fit's noise into ``noise`` (R, C, H, W), which holds zeros."""

    def _extra_state(self) -> dict[str, Any]:
        """The subclass's own counters, saved next to the noise."""
        return {}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        """Check and restore what :meth:`_extra_state` saved (called before the noise is restored)."""

    # ------------------------------------------------------------------ state
    def setup(self, stage: str) -> None:
        dm = self.trainer.datamodule
        if dm is None or not hasattr(dm, "clean_split"):
            raise RuntimeError(f"{type(self).__name__} needs a UEDataModule (run it through `ue` or pass datamodule=)")
        stream_checkpoints(self.trainer)
        clean = dm.clean_split("train")
        shape = (self.noise_rows(), *clean.image_shape)
        fingerprint = asdict(clean.fingerprint())
        if self._fingerprint is not None:  # the noise was restored before setup (load_from_checkpoint)
            self._check_same_data(self._fingerprint, fingerprint)
        self._fingerprint = fingerprint
        if self._store is None:  # a checkpoint given with `--ckpt_path` is restored into it after setup
            self._store = self._new_store(shape, fill=self._fill_initial if stage == "fit" else None)
            self.covered = torch.zeros(dm.num_train_samples, dtype=torch.bool)
            self._has_noise = stage == "fit"
        elif tuple(self.noise.shape) != shape:
            raise ValueError(f"the restored noise has shape {tuple(self.noise.shape)} but this data needs {shape}: "
                             "use the data settings the generator was fitted with")

    def _new_store(self, shape: tuple[int, ...], fill: Callable[[Tensor], None] | None) -> NoiseStore:
        kind = "memory" if self.classwise else choose_kind(self.noise_store, shape, self.noise_dtype)
        if kind == "memory":
            store = NoiseStore.memory(shape, self.noise_dtype)
            if fill is not None:
                fill(store.tensor)
            return store
        directory = self.noise_store_dir or self.trainer.default_root_dir
        return NoiseStore.file(shape, self.noise_dtype, self.trainer, directory, fill=fill)

    def _check_same_data(self, saved: dict[str, Any], current: dict[str, Any]) -> None:
        norm = lambda v: tuple(v) if isinstance(v, (list, tuple)) else v  # noqa: E731
        diffs = sorted(k for k in saved if k in current and norm(saved[k]) != norm(current[k]))
        if diffs:
            raise ValueError(f"this {self.method} checkpoint was fitted on other data ({saved.get('dataset')}/"
                             f"{saved.get('split')}; differs in {', '.join(diffs)}): use the dataset, "
                             "root and image size it was fitted with, or fit a new generator")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # A reference, not a copy: StreamingCheckpointIO writes it from the store's own memory.
        checkpoint[self.checkpoint_key] = {"noise": self.noise, "covered": self.covered,
                                           "fingerprint": self._fingerprint, **self._extra_state()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get(self.checkpoint_key)
        if state is None or state.get("noise") is None:
            raise ValueError(self.no_noise_message)
        self._load_extra_state(state)
        if self._fingerprint is not None and state.get("fingerprint") is not None:
            self._check_same_data(state["fingerprint"], self._fingerprint)
        self._fingerprint = state.get("fingerprint") or self._fingerprint
        covered = state.get("covered")
        self.covered = None if covered is None else covered.cpu().clone()
        if self._store is None:  # load_from_checkpoint: no trainer, no store yet
            self.noise = state["noise"].to(device="cpu", dtype=self.noise_dtype)
        else:  # `--ckpt_path`: setup made the store; each rank copies its share (block by block)
            self._store.load_(state["noise"])
        self._has_noise = True

    def _check_covers(self, index: Tensor) -> None:
        """Refuse to predict samples that no pass of the fit updated (a fit on another subset)."""
        if self.covered is None or self.classwise or self.covered[index].all():
            return
        missing = int((~self.covered[index]).sum())
        raise ValueError(f"{missing} of the {len(index)} samples to predict were not in the train set the "
                         f"generator was fitted on ({int(self.covered.sum())} samples): use the same "
                         "data.train_subset and data.seed as for `ue fit`")

    # ------------------------------------------------------------------ passes
    def _sharded_loader(self, dataset: Dataset, batch_size: int, shuffle: bool = False,
                        epoch: int = 0) -> DataLoader:
        """``dataset`` in order (or shuffled by ``seed`` and ``epoch``), sharded over DDP ranks."""
        world = self.trainer.world_size
        if world > 1:
            sampler = DistributedSampler(dataset, num_replicas=world, rank=self.trainer.global_rank,
                                         shuffle=shuffle, seed=self.seed)
            sampler.set_epoch(epoch)
        elif shuffle:
            sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch))
        else:
            sampler = None
        return DataLoader(dataset, batch_size=batch_size, shuffle=False, sampler=sampler,
                          num_workers=self.trainer.datamodule.num_workers, pin_memory=torch.cuda.is_available())

    def _gather(self, t: Tensor) -> Tensor:
        """Concatenate a per-rank batch tensor over ranks (rank order), on the CPU."""
        if self.trainer.world_size == 1:
            return t.cpu()
        return self.all_gather(t.to(self.device)).flatten(0, 1).cpu()

    def _store_batch(self, index: Tensor, delta: Tensor, seen: Tensor | None = None,
                     extra: tuple[Tensor, ...] = ()) -> tuple[Tensor, ...]:
        """Gather a pass's batch over ranks, drop repeated indices and store the noise of the rest.

        Repeats are dropped within the gathered batch, and, given ``seen`` (bool (N,)), across
        the pass (:func:`~ue_lightning.ops.shard_duplicates.first_unseen`). Returns the gathered ``index``,
        the bool mask of the rows kept and the gathered ``extra`` tensors.
        """
        index, delta = self._gather(index), self._gather(delta)
        keep = first_occurrences(index) if seen is None else first_unseen(index, seen)
        self._store.write(index[keep], delta[keep])
        if self.covered is not None:  # None: restored from a checkpoint that did not record it
            self.covered[index[keep]] = True
        self._store.sync()
        return (index, keep, *(self._gather(t) for t in extra))

    def _check_ranks_agree(self, when: str) -> None:
        """Under DDP, every copy of the noise (one per rank, or one per node) must be the same (checksums)."""
        if self.trainer.world_size == 1:
            return
        sums = self.all_gather(self._store.checksum().to(self.device)).cpu()
        sums = sums.view(-1, self._store.writers, 3)  # (copies, blocks of a copy, 3)
        if not torch.equal(sums.min(0).values, sums.max(0).values):
            raise RuntimeError(f"{self.method} noise differs across DDP ranks {when} "
                               f"(checksums {sums.tolist()}); this is a bug, please report it")
