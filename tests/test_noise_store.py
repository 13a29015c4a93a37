"""NoiseStore (memory or a node-shared memory-mapped file), the streaming checkpoint IO, StoredNoiseGenerator's state.

The noise itself, in either store and through a checkpoint, is pinned in test_noise_pin.py;
under 2-process DDP with the file store, in test_em.py and test_tue.py (slow tests).
"""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from conftest import cpu_trainer
from ue_lightning.modules import noise_store
from ue_lightning.modules import ErrorMinimizingNoise, TransferableNoise
from ue_lightning.modules.noise_store import NoiseStore, StreamingCheckpointIO, choose_kind, stream_checkpoints


def _trainer(tmp_path) -> L.Trainer:
    return cpu_trainer(tmp_path, inference_mode=True)


def test_auto_keeps_small_noise_in_memory():
    assert choose_kind("auto", (50_000, 3, 32, 32), torch.float32) == "memory"  # CIFAR-10: 614 MB
    assert choose_kind("auto", (128_000, 3, 256, 256), torch.float16) == "file"  # the ImageNet subset: 50 GB
    assert choose_kind("file", (1, 1, 1, 1), torch.float32) == "file"
    with pytest.raises(ValueError, match="noise_store='disk'"):
        choose_kind("disk", (1,), torch.float32)
    with pytest.raises(ValueError, match="noise_store"):
        ErrorMinimizingNoise(noise_store="disk")


def test_ranks_sharing_a_copy_each_write_their_share_of_a_batch():
    shared = torch.zeros(6, 1, 2, 2)
    ranks = [NoiseStore(shared, writer_rank=r, writers=2, barrier=lambda: None) for r in range(2)]
    index, rows = torch.tensor([4, 0, 5, 2]), torch.arange(1.0, 5.0).view(4, 1, 1, 1).expand(4, 1, 2, 2)
    ranks[0].write(index, rows)
    assert shared[:, 0, 0, 0].tolist() == [0, 0, 0, 0, 1, 3]  # rows 0 and 2 of the batch
    ranks[1].write(index, rows)
    assert shared[:, 0, 0, 0].tolist() == [2, 0, 4, 0, 1, 3]  # every row once
    private = NoiseStore(torch.zeros(6, 1, 2, 2))
    private.write(index, rows)
    assert torch.equal(private.tensor, shared)


def test_checksum_and_load_go_by_blocks(monkeypatch):
    monkeypatch.setattr(noise_store, "CHUNK_BYTES", 2 * 4 * 4)  # two rows of (1, 2, 2) float32 a block
    source = torch.randn(7, 1, 2, 2)
    copies = [NoiseStore(torch.zeros(7, 1, 2, 2), writer_rank=r, writers=2, barrier=lambda: None) for r in range(2)]
    copies[0].load_(source)
    assert torch.equal(copies[0].tensor[:2], source[:2]) and not copies[0].tensor[2:4].any()  # blocks 0 and 2
    total = NoiseStore(source.clone()).checksum()
    halves = [NoiseStore(source, writer_rank=r, writers=2, barrier=lambda: None).checksum() for r in range(2)]
    assert torch.allclose(halves[0] + halves[1], total)
    with pytest.raises(ValueError, match="data settings"):
        NoiseStore(torch.zeros(3, 1, 2, 2)).load_(source)


def test_file_store_is_a_memory_map_whose_file_is_gone(tmp_path):
    def fill(t):
        t[:] = 0.25

    store = NoiseStore.file((5, 3, 4, 4), torch.float16, _trainer(tmp_path), tmp_path, fill=fill)
    assert store.kind == "file" and store.tensor.dtype == torch.float16 and not store.shared
    assert (store.tensor == 0.25).all()
    maps = [line for line in open("/proc/self/maps") if str(tmp_path) in line]
    assert maps and all(line.rstrip().endswith("(deleted)") for line in maps), maps  # mapped, and unlinked
    assert list(tmp_path.iterdir()) == []  # unlinked once mapped: a killed run leaves no file
    store.write(torch.tensor([1]), torch.ones(1, 3, 4, 4))
    assert store.tensor[1].float().sum() == 48 and store.tensor[0].float().sum() == 12


def test_streaming_checkpoint_io_round_trip(tmp_path):
    io = StreamingCheckpointIO()
    mapped = torch.from_numpy(np.memmap(tmp_path / "m", dtype=np.float16, mode="w+", shape=(9, 1, 2, 2)))
    mapped[:] = 0.5
    path = tmp_path / "a" / "x.ckpt"
    io.save_checkpoint({"noise": mapped, "n": 3}, path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["x.ckpt"]  # no temporary left
    loaded = io.load_checkpoint(path)
    assert loaded["n"] == 3 and torch.equal(loaded["noise"], mapped)
    legacy = tmp_path / "legacy.ckpt"
    torch.save({"n": 4}, legacy, _use_new_zipfile_serialization=False)  # no mmap for that format: plain load
    assert io.load_checkpoint(legacy)["n"] == 4

    trainer = _trainer(tmp_path)
    stream_checkpoints(trainer)
    assert type(trainer.strategy.checkpoint_io) is StreamingCheckpointIO

    class Custom(TorchCheckpointIO):
        pass

    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, plugins=[Custom()])
    stream_checkpoints(trainer)
    assert type(trainer.strategy.checkpoint_io) is Custom  # a user's own IO is left alone


def test_a_tue_checkpoint_without_coverage_or_fingerprint_still_loads():
    """TUE checkpoints from before the shared base hold only the noise and the pass count."""
    module = TransferableNoise(in_channels=1, image_size=8, width=4, noise_dtype="float16")
    noise = torch.rand(4, 1, 8, 8)
    module.on_load_checkpoint({"transferable_noise": {"noise": noise, "noise_passes": 3}})
    assert module.noise_passes == 3 and module.covered is None
    assert torch.equal(module.noise, noise.half())
    with pytest.raises(ValueError, match="no TUE noise"):
        module.on_load_checkpoint({"error_minimizing_noise": {"noise": noise}})
    assert TransferableNoise(state_dtype="float16").noise_dtype == torch.float16  # their former setting name
