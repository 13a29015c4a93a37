"""`ue import` / `ue export --format em|rem|apbench`: the authors' noise files and APBench's poisoned-dataset
folders, written here in their layouts.

EM (HanxunH/Unlearnable-Examples): ``torch.save`` of a float tensor (R, C, H, W) in 1/255 of the pixel range, applied
by their CIFAR loader as ``uint8(clip(float32(x) + clamp(255 t, 0, 255), 0, 255))``. REM (fshp971/...): a pickled
int8 array (N, C, H, W) in 1/255 units, applied as ``uint8(clip(int16(x) + n, 0, 255))``. The digits stand in for
CIFAR (1347 train images, 1x8x8, 10 classes).
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from ue_lightning.data import NoiseFile, apply_delta
from ue_lightning.data.authors_noise import import_noise
from ue_lightning.data.datasets import load_dataset
from ue_lightning.data.export import export_protected
from ue_lightning.data.noise_file import NoiseMetadata, quantize_delta

CLEAN = load_dataset("digits", "data", True)
X = CLEAN.image_batch(np.arange(len(CLEAN)))  # uint8 (1347, 1, 8, 8)


def em_loader(x: torch.Tensor, t: torch.Tensor, keep_negative: bool) -> torch.Tensor:
    """EM's CIFAR loader on images ``x`` (uint8) and a perturbation.pt tensor ``t`` (one row per image)."""
    levels = t.mul(255).clamp(-255 if keep_negative else 0, 255).numpy()
    return torch.from_numpy(np.clip(x.numpy().astype(np.float32) + levels, 0, 255).astype(np.uint8))


@pytest.mark.parametrize("negative", ["keep", "drop"])
def test_em_samplewise_import_gives_the_images_the_authors_loader_makes(tmp_path, negative):
    torch.manual_seed(0)
    t = (torch.rand(len(CLEAN), 1, 8, 8) * 2 - 1) * 8 / 255  # not on whole grey levels, both signs
    torch.save(t, tmp_path / "perturbation.pt")
    out = import_noise(str(tmp_path / "perturbation.pt"), str(tmp_path / "em.safetensors"), "digits",
                       format="em", negative=negative)
    noise = NoiseFile.open(out)
    noise.check_matches(CLEAN.fingerprint())
    assert not noise.classwise and noise.metadata.method == "em-imported"
    assert noise.metadata.epsilon == (8 if negative == "keep" else 7)  # the largest |delta| written: +7.99 truncates to 7
    ours = apply_delta(X, torch.from_numpy(np.array(noise.delta)))
    assert torch.equal(ours, em_loader(X, t, keep_negative=negative == "keep"))
    assert (np.array(noise.delta).min() < 0) == (negative == "keep")  # EM's loader drops the negative half


def test_em_classwise_import_is_one_whole_level_pattern_a_class(tmp_path):
    t = torch.full((10, 1, 8, 8), 7.6 / 255)
    t[:, :, :4] = -3.2 / 255
    t[3] = 8 / 255  # 8/255 * 255 is 7.9999... in float32: still 8 grey levels, as the loader's float32 sum gives
    torch.save(t, tmp_path / "classwise.pt")
    noise = NoiseFile.open(import_noise(str(tmp_path / "classwise.pt"), str(tmp_path / "cw.safetensors"), "digits",
                                        format="em", negative="keep"))
    assert noise.classwise and noise.delta.shape == (10, 1, 8, 8)
    assert np.unique(np.array(noise.delta)[0]).tolist() == [-4, 7] and np.array(noise.delta)[3].min() == 8
    rows = np.flatnonzero(CLEAN.targets.numpy() == 0)[:50]  # away from 0 and 255 the truncation is a floor
    inner = (X[rows].int() >= 8) & (X[rows].int() <= 247)
    loader = em_loader(X[rows], t[CLEAN.targets[rows]], keep_negative=True)
    assert torch.equal(apply_delta(X[rows], noise.delta_for(rows, CLEAN.targets[rows].numpy()))[inner], loader[inner])


def _our_noise(tmp_path) -> NoiseFile:
    torch.manual_seed(1)
    delta = quantize_delta(X, (torch.rand(X.shape) * 2 - 1) * 8 / 255, epsilon=8)
    meta = NoiseMetadata(method="em-samplewise", epsilon=8.0, classwise=False, fingerprint=CLEAN.fingerprint())
    return NoiseFile.write(tmp_path / "ours.safetensors", delta, meta)


@pytest.mark.parametrize("format, negative", [("rem", "drop"), ("em", "keep")])
def test_export_then_import_is_bit_exact(tmp_path, format, negative):
    ours = _our_noise(tmp_path)
    assert np.array(ours.delta).min() < 0 < np.array(ours.delta).max()
    theirs = export_protected(str(ours.path), str(tmp_path / f"theirs.{format}"), "digits", format=format)
    back = NoiseFile.open(import_noise(str(theirs), str(tmp_path / "back.safetensors"), "digits", format=format,
                                       negative=negative))
    assert np.array_equal(np.array(back.delta), np.array(ours.delta))
    assert back.metadata.fingerprint == ours.metadata.fingerprint and back.metadata.epsilon == 8
    if format == "rem":  # what REM's loader reads: a plain int8 array (N, C, H, W)
        with open(theirs, "rb") as f:
            raw = pickle.load(f)
        assert raw.dtype == np.int8 and raw.shape == (len(CLEAN), 1, 8, 8)
        protected = np.clip(X.numpy().astype(np.int16) + raw, 0, 255).astype(np.uint8)
        assert np.array_equal(protected, apply_delta(X, torch.from_numpy(np.array(ours.delta))).numpy())
    else:  # what EM's loader makes of it, negative half kept
        t = torch.load(theirs, weights_only=True)
        assert torch.equal(em_loader(X, t, keep_negative=True), apply_delta(X, torch.from_numpy(np.array(ours.delta))))


class _Runs:
    def __reduce__(self):
        import os

        return os.system, ("echo never",)


@pytest.mark.parametrize("write, fmt, says", [
    (lambda p: torch.save(torch.zeros(100, 1, 8, 8), p), "em", "100 rows: neither the 1347 train samples nor the 10"),
    (lambda p: torch.save(torch.zeros(1347, 3, 32, 32), p), "em", "images are (1, 8, 8)"),
    (lambda p: torch.save({"noise": torch.zeros(3)}, p), "em", "holds dict"),
    (lambda p: p.write_bytes(pickle.dumps(_Runs())), "rem", "not a REM noise file"),
    (lambda p: p.write_bytes(pickle.dumps(np.zeros((1347, 1, 8, 8), np.float32))), "rem", "float32 array"),
    (lambda p: p.write_text("not a tensor"), "em", "not a tensor file"),
], ids=["rows", "image-shape", "not-a-tensor", "code-in-pickle", "rem-float", "garbage"])
def test_a_foreign_file_is_refused_in_one_line_naming_the_fix(tmp_path, capsys, write, fmt, says):
    import ue_lightning.cli as cli

    source = tmp_path / "theirs.bin"
    write(source)
    with pytest.raises(SystemExit) as stop:
        cli.main(["import", "--source", str(source), "--format", fmt, "--dataset", "digits",
                  "--output", str(tmp_path / "n.safetensors")])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and len(err.strip().splitlines()) == 1 and says in err, err
    assert not (tmp_path / "n.safetensors").exists()


def test_class_wise_noise_is_not_exported_in_rems_sample_wise_layout(tmp_path):
    meta = NoiseMetadata(method="em-classwise", epsilon=8.0, classwise=True, fingerprint=CLEAN.fingerprint())
    noise = NoiseFile.write(tmp_path / "cw.safetensors", np.full((10, 1, 8, 8), 3, np.int8), meta)
    with pytest.raises(ValueError, match="use --format em"):
        export_protected(str(noise.path), str(tmp_path / "cw.pkl"), "digits", format="rem")
    assert not (tmp_path / "cw.pkl").exists()
    theirs = export_protected(str(noise.path), str(tmp_path / "cw.pt"), "digits", format="em")
    assert torch.load(theirs, weights_only=True).shape == (10, 1, 8, 8)


def test_noise_beyond_a_noise_files_budget_is_refused_and_nothing_is_written(tmp_path, capsys):
    import ue_lightning.cli as cli

    torch.save(torch.full((len(CLEAN), 1, 8, 8), 0.8), tmp_path / "big.pt")  # +204/255: int8 would wrap it
    with pytest.raises(SystemExit) as stop:
        cli.main(["import", "--source", str(tmp_path / "big.pt"), "--format", "em", "--dataset", "digits",
                  "--output", str(tmp_path / "big.safetensors")])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "at most 64/255 (nothing was written)" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.pt"]


def test_an_existing_output_is_never_overwritten(tmp_path):
    ours = _our_noise(tmp_path)
    (tmp_path / "taken.pkl").write_bytes(b"keep me")
    with pytest.raises(FileExistsError, match="choose a new --output file"):
        export_protected(str(ours.path), str(tmp_path / "taken.pkl"), "digits", format="rem")
    assert (tmp_path / "taken.pkl").read_bytes() == b"keep me"


def write_apbench_folder(folder, poisoned: torch.Tensor) -> None:
    """APBench's export_poison: ``data/<index>.png`` of ``round(255 x)`` for each poisoned image (float in [0, 1])."""
    from PIL import Image

    (folder / "data").mkdir(parents=True)
    for i, image in enumerate(poisoned):
        pixels = image.mul(255).add(0.5).clamp(0, 255).to(torch.uint8)[0].numpy()  # the digits: one channel
        Image.fromarray(pixels).save(folder / "data" / f"{i}.png")


def test_apbench_import_reads_the_poisoned_pngs_exactly_and_export_writes_them_back(tmp_path):
    torch.manual_seed(0)
    poisoned = (X.float() / 255 + (torch.rand(X.shape) * 2 - 1) * 8 / 255).clamp(0, 1)  # EM-like: float, clipped
    write_apbench_folder(tmp_path / "em_poisons" / "digits", poisoned)
    out = import_noise(str(tmp_path / "em_poisons" / "digits"), str(tmp_path / "ap.safetensors"), "digits",
                       format="apbench")
    noise = NoiseFile.open(out)
    noise.check_matches(CLEAN.fingerprint())
    written = poisoned.mul(255).add(0.5).clamp(0, 255).to(torch.uint8)
    assert torch.equal(apply_delta(X, torch.from_numpy(np.array(noise.delta))), written)
    assert noise.metadata.epsilon == 8 and not noise.classwise

    back = export_protected(str(out), str(tmp_path / "export"), "digits", format="apbench")
    files = sorted((back / "data").iterdir(), key=lambda p: int(p.stem))
    assert [p.name for p in files] == [f"{i}.png" for i in range(len(CLEAN))]  # APBench's names, nothing else
    again = import_noise(str(back), str(tmp_path / "again.safetensors"), "digits", format="apbench")
    assert np.array_equal(np.array(NoiseFile.open(again).delta), np.array(noise.delta))  # bit-exact round trip


def test_apbench_folders_that_cannot_be_the_noise_are_refused_in_one_line(tmp_path):
    poisoned = X.float() / 255
    write_apbench_folder(tmp_path / "short", poisoned[:-1])
    with pytest.raises(ValueError, match=r"1346 PNGs, 1 missing \(first 1346.png\).*give the folder"):
        import_noise(str(tmp_path / "short"), str(tmp_path / "a.safetensors"), "digits", format="apbench")
    ops = poisoned.clone()
    ops[5, 0, 3, 3] = 1.0 - ops[5, 0, 3, 3].round()  # OPS: one pixel moved across the range
    write_apbench_folder(tmp_path / "ops", ops)
    with pytest.raises(ValueError, match=r"up to 1[0-9][0-9]/255 .* at most 64/255 \(nothing was written\)"):
        import_noise(str(tmp_path / "ops"), str(tmp_path / "b.safetensors"), "digits", format="apbench")
    assert not (tmp_path / "a.safetensors").exists() and not (tmp_path / "b.safetensors").exists()
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        import_noise(str(tmp_path / "nowhere"), str(tmp_path / "c.safetensors"), "digits", format="apbench")
