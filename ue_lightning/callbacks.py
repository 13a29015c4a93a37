"""PerturbationWriter: `ue predict` batches into one noise file, on one rank or many; the noise grid for TensorBoard."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Iterable, Sequence

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info

from ue_lightning.data.noise_file import NoiseFile, NoiseFileWriter, NoiseMetadata
from ue_lightning.pictures import perturbation_grid
from ue_lightning.ops.shard_duplicates import first_occurrences
from ue_lightning.scratch import scratch_dir


GRID_TAG = "noise/clean_noise_protected"


def tensorboard_loggers(loggers: Iterable[Logger]) -> list[TensorBoardLogger]:
    """The TensorBoard loggers among ``loggers``."""
    return [logger for logger in loggers if isinstance(logger, TensorBoardLogger)]


def log_perturbation_grid(loggers: Iterable[Logger], clean: torch.Tensor, delta: torch.Tensor, epsilon: float,
                          step: int, max_images: int = 8) -> bool:
    """Log the ``clean | noise | protected`` grid of a batch to every TensorBoard logger; False if there is none.

    Args:
        loggers: the trainer's loggers (CSV and other loggers are left alone).
        clean: uint8 images (B, C, H, W), 0-255.
        delta: int8 noise (B, C, H, W), 1/255 units.
        epsilon: the budget in 1/255 units.
        step: the global step the image is logged at.
        max_images: rows of the grid (the first images of the batch).
    """
    boards = tensorboard_loggers(loggers)
    if not boards:
        return False
    grid = perturbation_grid(list(clean[:max_images].cpu()), list(delta[:max_images].cpu()), epsilon)
    for board in boards:
        board.experiment.add_image(GRID_TAG, grid, global_step=step)  # uint8 (3, H, W)
    return True


class PerturbationWriter(BasePredictionWriter):
    """Write the noise a generator predicts over the train split to ``output``.

    The generator's ``predict_step`` returns ``{"index": int64 (B,), "delta": int8 (B, C, H, W)}``
    (1/255 units, rounded against the clean uint8 image), or, for class-wise noise, the
    module exposes ``class_delta() -> int8 (K, C, H, W)`` and the batches are ignored.

    Each rank appends its batches to its own shard files (ranks never share a file);
    after the last batch, rank 0 assembles the shards into the noise file, atomically,
    keeping the first copy of an index that the distributed sampler's padding repeated,
    and checking that every index of the predict set is there exactly once. Shards live
    next to ``output``, so multi-node runs need ``output`` on a shared filesystem.
    Memory is O(batch) while predicting and O(``chunk_rows``) while assembling (shards and
    the output are memory-mapped), plus 9 bytes a sample for the indices and coverage.

    Args:
        output: path of the noise file (``.safetensors``), written atomically.
        chunk_rows: rows copied at a time from a shard into the noise file.
    """

    def __init__(self, output: str, chunk_rows: int = 4096):
        super().__init__(write_interval="batch")
        self.output = Path(output)
        self.chunk_rows = int(chunk_rows)
        self._shards: Path | None = None  # this run's shard folder, chosen by rank 0 at predict start

    def _paths(self, rank: int) -> tuple[Path, Path]:
        return self._shards / f"rank{rank}.index", self._shards / f"rank{rank}.delta"

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # One folder per run (a concurrent run on the same output keeps its own); a killed run's is removed
        # by the next run for the same output (see ue_lightning.scratch).
        shards = str(scratch_dir(self.output, ".shards")) if trainer.is_global_zero else None
        self._shards = Path(trainer.strategy.broadcast(shards, src=0))
        trainer.strategy.barrier("PerturbationWriter.start")
        for p in self._paths(trainer.global_rank):
            p.write_bytes(b"")

    def write_on_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, prediction: Any,
                           batch_indices: Sequence[int] | None, batch: Any, batch_idx: int,
                           dataloader_idx: int = 0) -> None:
        if getattr(pl_module, "classwise", False):
            return
        index, delta = prediction["index"], prediction["delta"]
        if delta.dtype != torch.int8:
            raise TypeError(f"predict_step must return int8 delta in 1/255 units, got {delta.dtype}")
        index_path, delta_path = self._paths(trainer.global_rank)
        with open(index_path, "ab") as f:
            f.write(index.cpu().to(torch.int64).numpy().tobytes())
        with open(delta_path, "ab") as f:
            f.write(delta.cpu().contiguous().numpy().tobytes())

    def on_predict_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        trainer.strategy.barrier("PerturbationWriter.end")
        if trainer.is_global_zero:
            try:
                self._assemble(trainer, pl_module)
            finally:
                shutil.rmtree(self._shards, ignore_errors=True)
        trainer.strategy.barrier("PerturbationWriter.done")

    def _assemble(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        dm = trainer.datamodule
        clean = dm.clean_split("train")
        fingerprint = clean.fingerprint()
        meta = NoiseMetadata(classwise=bool(getattr(pl_module, "classwise", False)), fingerprint=fingerprint,
                             **pl_module.noise_metadata())
        if meta.classwise:
            NoiseFile.write(self.output, pl_module.class_delta().cpu(), meta)
            return
        shape = (len(clean), *clean.image_shape)
        expected = torch.as_tensor(dm.train_indices())
        with NoiseFileWriter(self.output, shape, meta) as w:
            for rank in range(trainer.world_size):
                index_path, delta_path = self._paths(rank)
                index = np.fromfile(index_path, dtype=np.int64)  # 8 bytes a sample
                # a rank may repeat an index (sampler padding), and ranks may share one
                keep = first_occurrences(torch.from_numpy(index)).numpy() & (w.covered[index] == 0)
                w.covered[index[keep]] = 1
                # The shard is mapped, not read: memory stays O(chunk) whatever the dataset's size.
                delta = np.memmap(delta_path, dtype=np.int8, mode="r", shape=(len(index), *clean.image_shape))
                for start in range(0, len(index), self.chunk_rows):
                    rows = slice(start, start + self.chunk_rows)
                    w.delta[index[rows][keep[rows]]] = delta[rows][keep[rows]]
                del delta
            got = torch.from_numpy(np.asarray(w.covered).nonzero()[0])
            if not torch.equal(got, expected.sort().values):
                missing = np.setdiff1d(expected.numpy(), got.numpy())
                raise RuntimeError(f"predict covered {len(got)} samples but the train set has {len(expected)} "
                                   f"(missing e.g. {missing[:5].tolist()}); the noise file was not written")
        rank_zero_info(f"wrote {NoiseFile.open(self.output)}")
