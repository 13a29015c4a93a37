"""Where a generator's noise state lives: a tensor per process, or one memory-mapped file per node.

A generator with stored noise (EM, TUE) keeps R rows of noise, (R, C, H, W) in pixel units,
R = the train split's N samples (or K classes), on the CPU. At the ImageNet subset's size
(about 128 000 x 3 x 256 x 256) that is 50 GB in float16: one copy per DDP rank does not fit
a node. :class:`NoiseStore` keeps it either

* in memory (``NoiseStore.memory``): a plain tensor, one per process, or
* in a file (``NoiseStore.file``): created by each node's local rank 0 and memory-mapped
  (``MAP_SHARED``) by every rank of the node, so a node holds one copy whatever its number of
  ranks, in the page cache, which the kernel can write back to the file and drop. The file is
  unlinked as soon as every rank of the node has mapped it: the mapping keeps it alive, and a
  killed run leaves nothing behind.

Writes. Every rank of a pass gathers the batch (all ranks' rows) and drops the duplicates the
sampler pads with, as before the store; then each rank writes its share of the gathered rows
(every ``writers``-th row from its ``writer_rank``): the whole batch with a private copy, a
disjoint part with a node-shared one, so the node's copy gets every row exactly once and no
two processes write the same row. :meth:`NoiseStore.sync` (a barrier, with a shared copy
only) then makes the batch visible to every rank before any reads its next batch, so a pass
reads exactly what it read with one copy per rank. Writing only one's own shard after the
pass would be cheaper but wrong on several nodes (another node's rows would never reach
this node's file) and would change what a pass reads within a pass (TUE's padded repeats).

:class:`StreamingCheckpointIO` saves and loads checkpoints without a full copy of the noise in
memory (Lightning's own serialises the whole checkpoint into a buffer on rank 0 and loads a
full copy on every rank); see its docstring.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from torch import Tensor

from ue_lightning.models.checkpoint_file import load_checkpoint_file
from ue_lightning.scratch import as_published, scratch_dir, scratch_file

StoreKind = Literal["auto", "memory", "file"]
AUTO_FILE_BYTES = 1 << 30  # ``auto`` keeps noise under 1 GiB in memory (CIFAR-10 float32: 614 MB)
CHUNK_BYTES = 8 << 20  # rows copied or summed at a time (load_, checksum: about 6 such blocks of temporaries)
_NUMPY = {torch.float32: np.float32, torch.float16: np.float16}


class NoiseStore:
    """Noise rows (R, C, H, W) on the CPU, in memory or in a node-shared memory-mapped file.

    ``tensor`` is the whole noise; read rows with ``tensor[rows]``. Write through :meth:`write`
    (this rank's share of a gathered batch) and :meth:`sync`, or :meth:`load_`.

    Args:
        tensor: the rows, (R, C, H, W).
        kind: ``memory`` or ``file`` (a memory map), for the record.
        writer_rank: this rank's position among the processes sharing ``tensor`` (its local rank).
        writers: number of processes sharing ``tensor`` (1: a private copy).
        barrier: waits for every rank (needed when ``writers > 1``).
    """

    def __init__(self, tensor: Tensor, writer_rank: int = 0, writers: int = 1,
                 barrier: Callable[[], None] | None = None, kind: Literal["memory", "file"] = "memory"):
        self.tensor, self.kind = tensor, kind
        self.writer_rank, self.writers = writer_rank, writers
        self._barrier = barrier

    @property
    def shared(self) -> bool:
        return self.writers > 1

    @classmethod
    def memory(cls, shape: tuple[int, ...], dtype: torch.dtype) -> "NoiseStore":
        """A private copy of zeros."""
        return cls(torch.zeros(shape, dtype=dtype))

    @classmethod
    def file(cls, shape: tuple[int, ...], dtype: torch.dtype, trainer: Any, directory: str | Path,
             fill: Callable[[Tensor], None] | None = None) -> "NoiseStore":
        """Zeros (or ``fill(tensor)``, run by each node's local rank 0) in a file mapped by the node's ranks.

        Every rank must call this (it broadcasts and waits). The file, ``node<node_rank>`` in a new
        folder ``.noise-store.<host>.<pid>.*`` of ``directory``, is unlinked once mapped.
        """
        strategy = trainer.strategy
        folder = str(scratch_dir(Path(directory) / "noise-store")) if trainer.is_global_zero else None
        folder = Path(strategy.broadcast(folder, src=0))
        path = folder / f"node{trainer.node_rank}"
        creator = trainer.local_rank == 0
        if creator:
            folder.mkdir(parents=True, exist_ok=True)  # another node's folder may be node-local
            with open(path, "wb") as f:
                f.truncate(int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size())  # sparse zeros
        strategy.barrier("NoiseStore.created")
        tensor = torch.from_numpy(np.memmap(path, dtype=_NUMPY[dtype], mode="r+", shape=shape))
        if creator and fill is not None:
            fill(tensor)
        strategy.barrier("NoiseStore.mapped")
        if creator:
            path.unlink()
            try:
                folder.rmdir()  # once every node has unlinked its file
            except OSError:
                pass
        return cls(tensor, trainer.local_rank, trainer.num_devices, lambda: strategy.barrier("NoiseStore.sync"), "file")

    def _share(self, n: int) -> slice:
        return slice(self.writer_rank, n, self.writers)

    def write(self, index: Tensor, rows: Tensor) -> None:
        """Store ``rows`` (B, C, H, W) at ``index`` (B,), distinct indices: this process's share of them."""
        share = self._share(len(index))
        self.tensor[index[share].cpu()] = rows[share].detach().cpu().to(self.tensor.dtype)

    def sync(self) -> None:
        """With a shared copy: wait until every rank has written (and so can read) what it wrote before."""
        if self.shared:
            self._barrier()

    def _blocks(self) -> list[slice]:
        """Contiguous row blocks of about CHUNK_BYTES; this process's share of them with a shared copy."""
        row_bytes = max(1, self.tensor[:1].numel() * self.tensor.element_size())
        step = max(1, CHUNK_BYTES // row_bytes)
        return [slice(s, s + step) for s in range(0, len(self.tensor), step)][self._share(None)]

    def load_(self, source: Tensor) -> None:
        """Copy ``source`` (R, C, H, W), e.g. a memory-mapped checkpoint tensor, in blocks; then sync."""
        if tuple(source.shape) != tuple(self.tensor.shape):
            raise ValueError(f"the restored noise has shape {tuple(source.shape)} but this data needs "
                             f"{tuple(self.tensor.shape)}: use the data settings the generator was fitted with")
        for rows in self._blocks():
            self.tensor[rows] = source[rows].to(self.tensor.dtype)
        self.sync()

    def checksum(self) -> Tensor:
        """float64 (3,): sum, sum of |x| and sum of x^2 over this process's share of the blocks."""
        sums = torch.zeros(3, dtype=torch.float64)
        for rows in self._blocks():
            block = self.tensor[rows].double()
            sums += torch.stack([block.sum(), block.abs().sum(), (block * block).sum()])
        return sums


def choose_kind(kind: StoreKind, shape: tuple[int, ...], dtype: torch.dtype) -> Literal["memory", "file"]:
    """``auto``: a file from AUTO_FILE_BYTES (1 GiB) of noise on, else memory."""
    if kind not in ("auto", "memory", "file"):
        raise ValueError(f"noise_store={kind!r}: choose auto, memory or file")
    if kind != "auto":
        return kind
    nbytes = int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size()
    return "file" if nbytes >= AUTO_FILE_BYTES else "memory"


class StreamingCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO without full in-memory copies of the checkpoint (local files only).

    * save: ``torch.save`` straight into a temporary sibling (streamed from each tensor's memory,
      a memory-mapped noise store included), fsync, rename; Lightning's ``TorchCheckpointIO``
      first serialises the whole checkpoint into a ``BytesIO`` on rank 0 (one or two full copies
      of the noise in anonymous memory).
    * load: ``torch.load(mmap=True)``: every tensor of the checkpoint is a private mapping of the
      file (page cache, shared by a node's ranks), copied where it is used (the noise into its
      store, block by block); Lightning's loads a full copy on every rank.

    Replacing a checkpoint by rename keeps a mapping of the old one valid. Checkpoints are read
    from local files only, by :func:`~ue_lightning.models.checkpoint.load_checkpoint_file`
    (``weights_only``; never Lightning's loader, which sends paths starting with ``http`` to
    torch.hub); a remote path is saved by ``TorchCheckpointIO``.
    """

    @staticmethod
    def _local(path: Any) -> bool:
        return isinstance(path, (str, Path)) and "://" not in str(path)

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or not self._local(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        fd, tmp = scratch_file(Path(path), ".ckpt.tmp")
        os.close(fd)
        try:
            torch.save(checkpoint, tmp)  # given a path, torch writes each tensor from its own memory
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            as_published(tmp)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def load_checkpoint(self, path: Any, map_location: Any = lambda storage, loc: storage,
                        weights_only: bool | None = None) -> dict[str, Any]:
        """The checkpoint at the local ``path``, memory-mapped, with ``weights_only=True`` whatever is asked."""
        return load_checkpoint_file(path, name="checkpoint", map_location=map_location, mmap=True,
                                    fix="pass a checkpoint that ue fit wrote (a local file)")


def stream_checkpoints(trainer: Any) -> None:
    """Give ``trainer`` a :class:`StreamingCheckpointIO` if it has Lightning's default one (else leave it)."""
    if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
        trainer.strategy.checkpoint_io = StreamingCheckpointIO()
