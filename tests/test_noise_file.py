"""The noise file: exact round trips, refusal of foreign data, atomic writes, lazy reads."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from safetensors import safe_open

from ue_lightning.data import (
    NoiseFile,
    NoiseFileError,
    NoiseFileWriter,
    NoiseMetadata,
    UEDataModule,
    apply_delta,
    quantize_delta,
)


def _random_delta(clean: torch.Tensor, eps: int = 8, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    delta = torch.randint(-eps, eps + 1, clean.shape, generator=g, dtype=torch.int16)
    protected = (clean.to(torch.int16) + delta).clamp(0, 255)
    return (protected - clean.to(torch.int16)).to(torch.int8)


def _write_for(dm: UEDataModule, path, delta=None, classwise=False):
    train = dm.clean_split("train")
    if delta is None:
        delta = _random_delta(train.images)
    meta = NoiseMetadata(method="test", epsilon=8, classwise=classwise, fingerprint=train.fingerprint())
    return NoiseFile.write(path, delta, meta)


def test_round_trip_is_exact_and_protected_equals_clean_plus_delta(fake_cifar10, tmp_path):
    dm = UEDataModule("cifar10", root=str(fake_cifar10), augment=False)
    clean = dm.clean_split("train").images
    delta = _random_delta(clean)
    assert (delta < 0).any() and (delta > 0).any()
    nf = _write_for(dm, tmp_path / "n.safetensors", delta)
    assert isinstance(nf.delta, np.memmap)  # lazy
    assert torch.equal(torch.from_numpy(np.array(nf.delta)), delta)
    # plain safetensors reads it too
    with safe_open(str(tmp_path / "n.safetensors"), framework="pt") as f:
        assert torch.equal(f.get_tensor("delta"), delta)
    # the DataModule serves clean + delta, to the byte, negative deltas included
    dm = UEDataModule("cifar10", root=str(fake_cifar10), augment=False, perturbation=str(tmp_path / "n.safetensors"))
    dm.setup("fit")
    x, y, index = next(iter(dm.train_dataloader()))
    served = (x * 255).round().to(torch.int16)
    expected = clean[index].to(torch.int16) + delta[index].to(torch.int16)
    assert torch.equal(served, expected)


def test_quantize_delta_rounds_and_stays_in_range():
    clean = torch.tensor([[[[0, 10, 250, 255]]]], dtype=torch.uint8)
    delta = torch.tensor([[[[-8 / 255, 3.6 / 255, 7.4 / 255, 8 / 255]]]])
    q = quantize_delta(clean, delta)
    assert q.tolist() == [[[[0, 4, 5, 0]]]]  # clipped at 0 and 255, rounded not truncated
    assert apply_delta(clean, q).tolist() == [[[[0, 14, 255, 255]]]]


def test_file_for_other_data_is_refused_naming_the_difference(fake_cifar10, fake_npz, tmp_path):
    dm = UEDataModule("cifar10", root=str(fake_cifar10))
    _write_for(dm, tmp_path / "c.safetensors")
    other = UEDataModule("npz", root=str(fake_npz), perturbation=str(tmp_path / "c.safetensors"))
    with pytest.raises(NoiseFileError) as e:
        other.setup("fit")
    msg = str(e.value)
    assert "num_samples: file has 100, data has 60" in msg
    assert "image_shape" in msg and "dataset" in msg and "ue predict" in msg


def test_same_shape_but_other_images_is_refused(fake_cifar10, tmp_path):
    dm = UEDataModule("cifar10", root=str(fake_cifar10))
    train = dm.clean_split("train")
    fp = train.fingerprint()
    fake = type(fp)(**{**fp.__dict__, "images_sha256": "0" * 64})
    NoiseFile.write(tmp_path / "n.safetensors", _random_delta(train.images),
                    NoiseMetadata(method="t", epsilon=8, classwise=False, fingerprint=fake))
    with pytest.raises(NoiseFileError, match="images_sha256"):
        NoiseFile.open(tmp_path / "n.safetensors").check_matches(fp)


def test_split_mismatch_is_named(fake_cifar10, tmp_path):
    dm = UEDataModule("cifar10", root=str(fake_cifar10))
    test = dm.clean_split("test")
    NoiseFile.write(tmp_path / "t.safetensors", _random_delta(test.images),
                    NoiseMetadata(method="t", epsilon=8, classwise=False, fingerprint=test.fingerprint()))
    with pytest.raises(NoiseFileError, match="split: file has 'test', data has 'train'"):
        NoiseFile.open(tmp_path / "t.safetensors").check_matches(dm.clean_split("train").fingerprint())


def test_corrupt_and_missing_files_are_refused_clearly(tmp_path, fake_cifar10):
    with pytest.raises(NoiseFileError, match="does not exist"):
        NoiseFile.open(tmp_path / "missing.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 3)
    with pytest.raises(NoiseFileError, match="corrupt"):
        NoiseFile.open(bad)
    dm = UEDataModule("cifar10", root=str(fake_cifar10))
    good = _write_for(dm, tmp_path / "good.safetensors")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.path.read_bytes()[:-100])
    with pytest.raises(NoiseFileError, match="corrupt"):
        NoiseFile.open(truncated)


def test_failed_write_leaves_previous_file_intact(fake_cifar10, tmp_path):
    dm = UEDataModule("cifar10", root=str(fake_cifar10))
    path = tmp_path / "out" / "n.safetensors"
    first = _write_for(dm, path)
    before = path.read_bytes()
    meta = first.metadata
    with pytest.raises(RuntimeError):
        with NoiseFileWriter(path, first.delta.shape, meta) as w:
            w.delta[:] = 1
            raise RuntimeError("crash mid-write")
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == ["n.safetensors"]  # no temporary left behind


def test_classwise_file_applies_each_class_delta(fake_cifar10, tmp_path):
    dm = UEDataModule("cifar10", root=str(fake_cifar10), augment=False)
    train = dm.clean_split("train")
    class_delta = torch.arange(10, dtype=torch.int8).view(10, 1, 1, 1).expand(10, 3, 32, 32) - 5
    meta = NoiseMetadata(method="t", epsilon=8, classwise=True, fingerprint=train.fingerprint())
    NoiseFile.write(tmp_path / "cw.safetensors", class_delta.contiguous(), meta)
    dm = UEDataModule("cifar10", root=str(fake_cifar10), augment=False, perturbation=str(tmp_path / "cw.safetensors"))
    dm.setup("fit")
    x, y, index = next(iter(dm.train_dataloader()))
    expected = (train.images[index].to(torch.int16) + (y - 5).view(-1, 1, 1, 1)).clamp(0, 255)
    assert torch.equal((x * 255).round().to(torch.int16), expected)


def test_uncovered_samples_are_refused(fake_cifar10, tmp_path):
    dm = UEDataModule("cifar10", root=str(fake_cifar10))
    train = dm.clean_split("train")
    covered = torch.ones(len(train), dtype=torch.uint8)
    covered[7] = 0
    meta = NoiseMetadata(method="t", epsilon=8, classwise=False, fingerprint=train.fingerprint())
    NoiseFile.write(tmp_path / "p.safetensors", _random_delta(train.images), meta, covered=covered)
    dm = UEDataModule("cifar10", root=str(fake_cifar10), perturbation=str(tmp_path / "p.safetensors"))
    with pytest.raises(NoiseFileError, match="train_subset"):
        dm.setup("fit")


def test_a_killed_runs_leftovers_are_removed_by_the_next_write_and_live_ones_kept(tmp_path):
    import socket
    import subprocess

    from ue_lightning.scratch import scratch_dir

    proc = subprocess.Popen(["true"])
    proc.wait()  # a process that no longer exists, as a killed run's
    host, out = socket.gethostname(), tmp_path / "n.safetensors"
    dead_file = tmp_path / f".n.safetensors.{host}.{proc.pid}.x1.tmp"
    dead_dir = tmp_path / f".n.safetensors.{host}.{proc.pid}.x2.shards"
    live_dir = tmp_path / f".n.safetensors.{host}.{os.getpid()}.x3.shards"  # a concurrent run's (this process)
    other_host = tmp_path / f".n.safetensors.another-node.{proc.pid}.x4.tmp"  # may be alive on its node
    dead_file.write_bytes(b"half a noise file")
    dead_dir.mkdir()
    (dead_dir / "rank0.delta").write_bytes(b"...")
    live_dir.mkdir()
    other_host.write_bytes(b"")
    unrelated = tmp_path / ".other.safetensors.x.tmp"
    unrelated.write_bytes(b"")

    mine = scratch_dir(out, ".shards")
    assert not dead_file.exists() and not dead_dir.exists()
    assert live_dir.exists() and other_host.exists() and unrelated.exists() and mine.is_dir()
    assert mine.name.startswith(f".n.safetensors.{host}.{os.getpid()}.")


def _rewrite_header(src, dst, edit) -> None:
    """Copy a noise file with its JSON header changed by ``edit(header) -> header``."""
    import json
    import struct

    raw = open(src, "rb").read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = edit(json.loads(raw[8:8 + n]))
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    open(dst, "wb").write(struct.pack("<Q", len(text)) + text + raw[8 + n:])


def _meta(edit):
    import json

    def change(header):
        meta = json.loads(header["__metadata__"]["ue_lightning"])
        edit(meta)
        header["__metadata__"]["ue_lightning"] = json.dumps(meta)
        return header
    return change


@pytest.mark.parametrize("edit", [
    lambda h: {**h, "delta": {**h["delta"], "shape": [2**62, 2**62, 1, 1]}},  # overflow
    lambda h: {**h, "delta": {**h["delta"], "data_offsets": [-5, h["delta"]["data_offsets"][1]]}},
    lambda h: {**h, "delta": {**h["delta"], "data_offsets": [3, h["delta"]["data_offsets"][1]]}},
    lambda h: {**h, "delta": {**h["delta"], "shape": [1.5, 3, 32, 32]}},
    lambda h: {**h, "covered": {**h["covered"], "dtype": "F32"}},
    lambda h: b"[" * 100_000 + b"]" * 100_000,  # recursion
    lambda h: b"\xff\xfe not json",
    _meta(lambda m: m.update(epsilon="8")),
    _meta(lambda m: m.update(epsilon=1e9)),
    _meta(lambda m: m.update(classwise="no")),
    _meta(lambda m: m["fingerprint"].update(image_shape=[3, -32, 32])),
    _meta(lambda m: m.update(fingerprint=None)),
])
def test_malformed_headers_are_refused_with_one_clear_error(fake_cifar10, tmp_path, edit):
    dm = UEDataModule("cifar10", root=str(fake_cifar10))
    good = _write_for(dm, tmp_path / "good.safetensors")
    bad = tmp_path / "bad.safetensors"
    _rewrite_header(good.path, bad, edit)
    with pytest.raises(NoiseFileError, match="regenerate it"):
        NoiseFile.open(bad)


def test_a_covered_mask_of_the_wrong_length_is_refused_in_one_line(tmp_path, capsys):
    from ue_lightning.cli import main

    good = _write_for(UEDataModule("digits"), tmp_path / "good.safetensors")
    rows = good.delta.shape[0]

    def shorter(header):  # one flag fewer, the file one byte shorter: every extent still adds up
        begin, end = header["covered"]["data_offsets"]
        return {**header, "covered": {**header["covered"], "shape": [rows - 1], "data_offsets": [begin, end - 1]}}
    bad = tmp_path / "short.safetensors"
    _rewrite_header(good.path, bad, shorter)
    bad.write_bytes(bad.read_bytes()[:-1])
    with pytest.raises(SystemExit) as stop:  # ue export indexed the mask by row: an IndexError's traceback
        main(["export", "--noise", str(bad), "--dataset", "digits", "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and len(err.rstrip("\n").splitlines()) == 1, err
    assert err.startswith(f"ue: error: cannot read {bad}") and f"{rows - 1} flags for {rows} delta rows" in err, err
    assert "regenerate it with `ue predict`" in err and not (tmp_path / "out").exists()
