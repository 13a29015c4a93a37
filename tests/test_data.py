"""Datasets in their real on-disk formats, the DataModule's subsets and protection share, export."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.transforms import v2

from ue_lightning.data import NoiseFile, NoiseMetadata, UEDataModule, load_dataset, protected_mask, stratified_subset
from ue_lightning.data.export import export_protected


def test_cifar_yields_image_label_index(fake_cifar10):
    dm = UEDataModule("cifar10", root=str(fake_cifar10), batch_size=16)
    dm.setup("fit")
    x, y, index = next(iter(dm.train_dataloader()))
    assert x.shape == (16, 3, 32, 32) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert torch.equal(y, dm.clean_split("train").targets[index])
    assert (dm.num_classes, dm.in_channels, dm.image_size, dm.num_train_samples) == (10, 3, 32, 100)
    assert len(dm.test_set) == 40


def test_missing_cifar_names_path_and_download(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        load_dataset("cifar10", tmp_path / "nowhere", True)
    assert "cifar-10-batches-py" in str(e.value) and "download" in str(e.value)


def write_fake_svhn(root: Path, n_train: int = 30, n_test: int = 20) -> dict[str, np.ndarray]:
    """torchvision's SVHN files as the dataset ships them (MATLAB v5: X (32, 32, 3, N) uint8, y (N, 1) with labels
    1-10, 10 for the digit 0); returns each split's X and y."""
    from scipy.io import savemat

    rng, written = np.random.default_rng(0), {}
    for split, n in (("train", n_train), ("test", n_test)):
        x = rng.integers(0, 256, size=(32, 32, 3, n), dtype=np.uint8)
        y = (np.arange(n) % 10 + 1).astype(np.uint8).reshape(n, 1)
        root.mkdir(parents=True, exist_ok=True)
        savemat(root / f"{split}_32x32.mat", {"X": x, "y": y})
        written[split] = (x, y)
    return written


@pytest.fixture
def fake_svhn(tmp_path, monkeypatch):
    from torchvision.datasets import SVHN

    root = tmp_path / "svhn"
    written = write_fake_svhn(root)
    md5 = {k: hashlib.md5((root / f"{k}_32x32.mat").read_bytes()).hexdigest() for k in ("train", "test")}
    monkeypatch.setattr(SVHN, "split_list", {k: [url, name, md5.get(k, sum_)]
                                             for k, (url, name, sum_) in SVHN.split_list.items()})
    return root, written


def test_svhn_is_read_from_torchvisions_files_with_10_as_0_and_no_flip(fake_svhn):
    root, written = fake_svhn
    train = load_dataset("svhn", root, True)
    x, y = written["train"]
    assert train.image_shape == (3, 32, 32) and len(train) == 30 and train.num_classes == 10
    image, label = train[13]
    assert torch.equal(image, torch.from_numpy(x[..., 13]).permute(2, 0, 1)) and label == int(y[13, 0]) % 10
    assert int(train.targets.min()) == 0 and int(train.targets.max()) == 9  # label 10 is the digit 0
    dm = UEDataModule("svhn", root=str(root), batch_size=8)
    dm.setup("fit")
    assert len(dm.test_set) == 20 and not any(isinstance(t, v2.RandomHorizontalFlip)
                                               for t in dm.train_set.dataset.transform.transforms)


def test_missing_or_foreign_svhn_names_the_file_and_the_fix(tmp_path, fake_svhn):
    with pytest.raises(FileNotFoundError) as e:
        load_dataset("svhn", tmp_path / "nowhere", True)
    assert "train_32x32.mat" in str(e.value) and "download" in str(e.value)
    root, _ = fake_svhn
    (root / "test_32x32.mat").write_bytes(b"not a MATLAB file")
    with pytest.raises(ValueError, match="is not the original SVHN test file"):
        load_dataset("svhn", root, False)


def test_missing_npz_and_folder_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="npz"):
        load_dataset("npz", tmp_path / "x.npz", True)
    with pytest.raises(FileNotFoundError, match="train/<class>"):
        load_dataset("imagenet_subset", tmp_path, True)
    with pytest.raises(ValueError, match="choose one of"):
        UEDataModule("mnist")


def test_imagenet_subset_first_classes_fixed_size(fake_image_folder):
    dm = UEDataModule("imagenet_subset", root=str(fake_image_folder), max_classes=3, resize=24, crop=20,
                      batch_size=4, augment=True)
    dm.setup("fit")
    train, test = dm.clean_split("train"), dm.clean_split("test")
    assert train.class_names == ["n00000000", "n00000001", "n00000002"]  # first 3 of 4, sorted
    assert len(train) == 18 and len(test) == 6 and dm.num_classes == 3
    image, label = train[0]  # a greyscale JPEG, read as RGB and resized
    assert image.shape == (3, 24, 24) and image.dtype == torch.uint8
    x, _, _ = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 20, 20)  # the training crop comes after the stored 24x24 image
    assert next(iter(dm.test_dataloader()))[0].shape[-1] == 20
    assert next(iter(dm.predict_dataloader()))[0].shape[-1] == 24  # noise is made at the stored size


def test_npz_and_digits(fake_npz):
    npz = UEDataModule("npz", root=str(fake_npz))
    assert (npz.num_classes, npz.in_channels, npz.image_size, npz.num_train_samples) == (10, 3, 16, 60)
    digits = UEDataModule("digits")
    assert (digits.num_classes, digits.in_channels, digits.image_size, digits.num_train_samples) == (10, 1, 8, 1347)
    big = UEDataModule("digits", resize=16)  # pixel repetition: same grey levels, each pixel a 2x2 block
    assert big.image_size == 16
    small, large = digits.clean_split("train").images, big.clean_split("train").images
    assert torch.equal(large, small.repeat_interleave(2, -1).repeat_interleave(2, -2))
    assert big.clean_split("train").fingerprint() != digits.clean_split("train").fingerprint()
    with pytest.raises(ValueError, match="whole factor"):
        UEDataModule("digits", resize=12).clean_split("train")
    with pytest.raises(ValueError, match="remove data.resize"):
        UEDataModule("npz", root=str(fake_npz), resize=16).clean_split("train")
    images = digits.clean_split("test").images
    assert images.dtype == torch.uint8 and images.max() == 255 and len(images) == 450


def test_stratified_subset_is_exact_seeded_and_balanced():
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)
    idx = stratified_subset(labels, 10, seed=3)
    assert len(idx) == 10 and len(set(idx.tolist())) == 10
    assert torch.bincount(labels[idx]).tolist() == [5, 3, 2]
    assert torch.equal(idx, stratified_subset(labels, 10, seed=3))
    assert not torch.equal(idx, stratified_subset(labels, 10, seed=4))
    with pytest.raises(ValueError):
        stratified_subset(labels, 101, seed=0)


@pytest.mark.parametrize("fraction", [0.0, 0.3, 1.0])
def test_protected_fraction_protects_exactly_that_share(fake_cifar10, tmp_path, fraction):
    dm = UEDataModule("cifar10", root=str(fake_cifar10), augment=False, train_subset=50)
    train = dm.clean_split("train")
    delta = torch.full((100, 3, 32, 32), 5, dtype=torch.int8)
    train.images[:] = 100  # no clipping: every protected pixel moves by exactly 5
    NoiseFile.write(tmp_path / "n.safetensors", delta,
                    NoiseMetadata(method="t", epsilon=5, classwise=False, fingerprint=train.fingerprint()))
    dm.perturbation, dm.protected_fraction = str(tmp_path / "n.safetensors"), fraction
    dm.setup("fit")
    changed = 0
    for x, y, index in dm.train_dataloader():
        diff = (x * 255).round() - train.images[index].float()
        moved = (diff == 5).all(dim=(1, 2, 3))
        assert (moved | (diff == 0).all(dim=(1, 2, 3))).all()
        changed += int(moved.sum())
    assert changed == round(fraction * 50)


@pytest.mark.parametrize("fraction", [0.0, 0.3, 0.8])
def test_drop_protected_trains_on_exactly_the_clean_rest(fake_cifar10, tmp_path, fraction):
    """The victim's samples under ``drop_protected`` are those the same fraction and seed leave clean."""
    train = UEDataModule("cifar10", root=str(fake_cifar10), train_subset=50).clean_split("train")
    NoiseFile.write(tmp_path / "n.safetensors", torch.full((100, 3, 32, 32), 5, dtype=torch.int8),
                    NoiseMetadata(method="t", epsilon=5, classwise=False, fingerprint=train.fingerprint()))
    kwargs = dict(root=str(fake_cifar10), augment=False, train_subset=50, perturbation=str(tmp_path / "n.safetensors"),
                  protected_fraction=fraction, seed=3)
    noised, dropped = UEDataModule("cifar10", **kwargs), UEDataModule("cifar10", drop_protected=True, **kwargs)
    noised.setup("fit")
    dropped.setup("fit")
    seen = {int(i) for _, _, index in dropped.train_dataloader() for i in index}
    clean_in_noised = {int(i) for x, _, index in noised.train_dataloader()
                       for xi, i in zip(x, index) if torch.equal((xi * 255).round(), noised.clean_split("train").images[i].float())}
    assert seen == clean_in_noised and len(seen) == 50 - round(fraction * 50)
    assert seen <= set(noised.train_indices().tolist())
    for x, _, index in dropped.train_dataloader():  # the clean images, untouched
        assert torch.equal((x * 255).round(), dropped.clean_split("train").images[index].float())
    assert "left out" in dropped.describe()
    with pytest.raises(ValueError, match="protected_fraction below 1"):
        UEDataModule("cifar10", root=str(fake_cifar10), drop_protected=True)


def test_protected_mask_choice_is_seeded():
    cand = torch.arange(10, 30)
    a = protected_mask(40, cand, 0.25, seed=1)
    assert a.sum() == 5 and a[cand].sum() == 5
    assert torch.equal(a, protected_mask(40, cand, 0.25, seed=1))
    with pytest.raises(ValueError):
        protected_mask(40, cand, 1.5, seed=1)


def _noise_for(dm, path):
    train = dm.clean_split("train")
    g = torch.Generator().manual_seed(0)
    delta = torch.randint(-8, 9, train.images.shape, generator=g, dtype=torch.int16)
    delta = ((train.images.to(torch.int16) + delta).clamp(0, 255) - train.images.to(torch.int16)).to(torch.int8)
    NoiseFile.write(path, delta, NoiseMetadata(method="t", epsilon=8, classwise=False, fingerprint=train.fingerprint()))
    return train.images.to(torch.int16) + delta


def test_export_png_and_cifar_round_trip(fake_cifar10, tmp_path, monkeypatch):
    from torchvision.datasets import CIFAR10

    dm = UEDataModule("cifar10", root=str(fake_cifar10))
    protected = _noise_for(dm, tmp_path / "n.safetensors")
    png = export_protected(str(tmp_path / "n.safetensors"), str(tmp_path / "png"), "cifar10", root=str(fake_cifar10))
    back = load_dataset("folder", png, True, resize=32)
    assert len(back) == 100
    # files are named by their index in the split
    for path, label in back.samples[:10]:
        i = int(path.split("/")[-1].split(".")[0])
        assert label == int(dm.clean_split("train").targets[i])
        image, _ = back[back.samples.index((path, label))]
        assert torch.equal(image.to(torch.int16), protected[i])
    out = export_protected(str(tmp_path / "n.safetensors"), str(tmp_path / "batches"), "cifar10",
                           root=str(fake_cifar10), format="cifar")
    # torchvision reads the exported batches (its md5 list is for the real CIFAR files only)
    monkeypatch.setattr(CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr("torchvision.datasets.cifar.check_integrity", lambda *a, **k: True)
    ds = CIFAR10(str(out), train=True)
    assert np.array_equal(ds.data.transpose(0, 3, 1, 2), protected.numpy().astype(np.uint8))
    assert ds.targets == dm.clean_split("train").targets.tolist() and ds.classes == dm.clean_split("train").class_names
    with pytest.raises(FileExistsError):
        export_protected(str(tmp_path / "n.safetensors"), str(tmp_path / "png"), "cifar10", root=str(fake_cifar10))


def test_outputs_meant_to_be_published_get_the_users_umask(fake_cifar10, tmp_path):
    """Noise files, exports, checkpoints and result files were written 0600 (folders 0700) through mkstemp/mkdtemp."""
    import stat

    from ue_lightning.modules.noise_store import StreamingCheckpointIO
    from ue_lightning.scratch import atomic_write_json

    def mode(path: Path) -> int:
        return stat.S_IMODE(path.stat().st_mode)

    before = os.umask(0o022)
    try:
        dm = UEDataModule("cifar10", root=str(fake_cifar10))
        _noise_for(dm, tmp_path / "n.safetensors")
        exports = [export_protected(str(tmp_path / "n.safetensors"), str(tmp_path / f"export-{fmt}"), "cifar10",
                                    root=str(fake_cifar10), format=fmt) for fmt in ("png", "cifar")]
        StreamingCheckpointIO().save_checkpoint({"state_dict": {"w": torch.zeros(2)}}, tmp_path / "last.ckpt")
        atomic_write_json(tmp_path / "metrics.json", {"test_acc": 0.5})
    finally:
        os.umask(before)
    assert {name: mode(tmp_path / name) for name in ("n.safetensors", "last.ckpt", "metrics.json")} == {
        "n.safetensors": 0o644, "last.ckpt": 0o644, "metrics.json": 0o644}
    for folder in exports:
        assert {mode(p) for p in [folder, *folder.rglob("*")] if p.is_dir()} == {0o755}, folder
        assert {mode(p) for p in folder.rglob("*") if p.is_file()} == {0o644}, folder


def test_ue_export_command_writes_png_tree(fake_npz, tmp_path):
    from conftest import run_ue

    dm = UEDataModule("npz", root=str(fake_npz))
    _noise_for(dm, tmp_path / "n.safetensors")
    run_ue("export", "--noise", str(tmp_path / "n.safetensors"), "--dataset", "npz", "--root", str(fake_npz),
           "--output", str(tmp_path / "out"))
    assert len(list((tmp_path / "out" / "train").rglob("*.png"))) == 60
    assert len(list((tmp_path / "out" / "val").rglob("*.png"))) == 30


@pytest.mark.parametrize("bad", ["../escape", "/tmp/escape", "a/b", "..", "", "dup"])
def test_export_refuses_class_names_that_are_not_folder_names(tmp_path, bad):
    rng = np.random.default_rng(0)
    names = ["dup" if bad == "dup" else f"c{k}" for k in range(10)]
    names[3] = bad
    path = tmp_path / "named.npz"
    np.savez(path, x_train=rng.integers(0, 256, (20, 8, 8, 3), dtype=np.uint8), y_train=np.arange(20) % 10,
             x_test=rng.integers(0, 256, (10, 8, 8, 3), dtype=np.uint8), y_test=np.arange(10) % 10,
             class_names=np.array(names))
    dm = UEDataModule("npz", root=str(path))
    _noise_for(dm, tmp_path / "n.safetensors")
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(ValueError, match="rename"):
        export_protected(str(tmp_path / "n.safetensors"), str(work / "out"), "npz", root=str(path))
    assert list(work.iterdir()) == [] and not (tmp_path / "escape").exists() and not Path("/tmp/escape").exists()


def test_a_delta_beyond_its_stated_epsilon_is_refused_for_training_and_export(fake_npz, tmp_path):
    dm = UEDataModule("npz", root=str(fake_npz))
    train = dm.clean_split("train")
    delta = torch.zeros(train.images.shape, dtype=torch.int8)
    delta[5, 0, 3, 3] = 100  # an eps-8 file with one edited pixel
    path = tmp_path / "edited.safetensors"
    NoiseFile.write(path, delta, NoiseMetadata(method="t", epsilon=8, classwise=False, fingerprint=train.fingerprint()))
    with pytest.raises(ValueError, match="up to 100/255 but says epsilon 8/255"):
        UEDataModule("npz", root=str(fake_npz), perturbation=str(path)).setup("fit")
    with pytest.raises(ValueError, match="damaged or was edited"):
        export_protected(str(path), str(tmp_path / "out"), "npz", root=str(fake_npz))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("change, says", [
    (lambda d: d.update(x_train=d["x_train"].transpose(0, 3, 1, 2)), "look NCHW"),
    (lambda d: d.update(y_train=d["y_train"] + 0.5), "fractions"),
    (lambda d: d.update(y_train=np.where(np.arange(60) == 7, -1, d["y_train"])), "negative"),
])
def test_npz_that_would_train_wrongly_is_refused(tmp_path, fake_npz, change, says):
    data = dict(np.load(fake_npz))
    change(data)
    path = tmp_path / "bad.npz"
    np.savez(path, **data)
    with pytest.raises(ValueError, match=says):
        UEDataModule("npz", root=str(path)).setup("fit")


def test_a_16_bit_png_keeps_its_grey_levels(fake_image_folder):
    from PIL import Image

    wide = (np.arange(40 * 30, dtype=np.uint16).reshape(30, 40) * 54).astype(np.uint16)  # 0 .. 64746
    path = fake_image_folder / "train" / "n00000000" / "wide.png"
    img = Image.fromarray(wide)
    assert img.mode.startswith("I;16")
    img.save(path)
    data = load_dataset("folder", fake_image_folder, True, resize=32)
    image, _ = data[[p for p, _ in data.samples].index(str(path))]
    assert image.float().std() > 40 and (image == 255).float().mean() < 0.05  # not clipped to white


def test_an_empty_class_folder_is_refused(fake_image_folder):
    (fake_image_folder / "train" / "n00000009").mkdir()
    with pytest.raises(ValueError, match="n00000009 holds no images"):
        load_dataset("folder", fake_image_folder, True, resize=32)


def test_unreadable_images_are_skipped_and_named_once(fake_image_folder):
    broken = fake_image_folder / "train" / "n00000001" / "broken.png"
    broken.write_bytes(b"not an image at all")
    with pytest.warns(UserWarning, match=r"skipped 1 file\(s\).*broken\.png") as record:
        data = load_dataset("folder", fake_image_folder, True, resize=32)
    assert len([w for w in record if "skipped" in str(w.message)]) == 1
    assert str(broken) not in [p for p, _ in data.samples]
    data[0]  # the rest still loads


def test_an_image_with_damaged_data_names_itself(fake_image_folder):
    from ue_lightning.data.datasets import CorruptImageError

    victim = sorted((fake_image_folder / "train" / "n00000002").iterdir())[0]
    victim.write_bytes(victim.read_bytes()[: len(victim.read_bytes()) // 2])  # header intact, data cut
    data = load_dataset("folder", fake_image_folder, True, resize=32)
    with pytest.raises(CorruptImageError, match=f"{victim.name} cannot be decoded.*replace or delete"):
        data[[p for p, _ in data.samples].index(str(victim))]


def test_cifar_export_reads_back_through_the_package_and_no_download_replaces_it(fake_cifar10, tmp_path):
    import pickle

    dm = UEDataModule("cifar10", root=str(fake_cifar10))
    protected = _noise_for(dm, tmp_path / "n.safetensors")
    out = export_protected(str(tmp_path / "n.safetensors"), str(tmp_path / "batches"), "cifar10",
                           root=str(fake_cifar10), format="cifar")
    back = UEDataModule("cifar10", root=str(out), download=True)  # download must not touch an export
    train, test = back.clean_split("train"), back.clean_split("test")
    assert torch.equal(train.images.to(torch.int16), protected)
    assert torch.equal(train.targets, dm.clean_split("train").targets)
    assert torch.equal(test.images, dm.clean_split("test").images)
    assert train.class_names == dm.clean_split("train").class_names

    batch = out / "cifar-10-batches-py" / "data_batch_1"  # a stranger's file that runs code when unpickled
    batch.write_bytes(pickle.dumps({"data": __import__("os").system, "labels": []}))
    with pytest.raises(ValueError, match="not a readable CIFAR batch"):
        UEDataModule("cifar10", root=str(out)).clean_split("train")

    (out / "cifar-10-batches-py" / "ue_lightning_export.json").unlink()  # not an export any more, not CIFAR
    with pytest.raises(ValueError, match="nothing is downloaded over them"):
        UEDataModule("cifar10", root=str(out), download=True).clean_split("train")


@pytest.mark.parametrize("where", ["absolute", "relative"])
def test_a_cifar_export_marker_naming_a_file_outside_its_folder_is_refused(fake_cifar10, tmp_path, where):
    import json
    import shutil

    dm = UEDataModule("cifar10", root=str(fake_cifar10))
    _noise_for(dm, tmp_path / "n.safetensors")
    out = export_protected(str(tmp_path / "n.safetensors"), str(tmp_path / "batches"), "cifar10",
                           root=str(fake_cifar10), format="cifar")
    folder = out / "cifar-10-batches-py"
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.copy(folder / "test_batch", outside / "test_batch")  # images from outside the export
    marker = folder / "ue_lightning_export.json"
    stranger = str(outside / "test_batch") if where == "absolute" else "../../elsewhere/test_batch"
    marker.write_text(json.dumps({**json.loads(marker.read_text()), "files": [
        *json.loads(marker.read_text())["files"], stranger]}))
    with pytest.raises(ValueError, match="not a batch file of the export") as err:
        UEDataModule("cifar10", root=str(out)).clean_split("test")
    assert stranger in str(err.value) and "ue export --format cifar" in str(err.value)


def test_a_module_seed_unlike_the_data_seed_is_accepted(tmp_path):
    """Lightning merges the module's and the datamodule's hyperparameters for the logger and refused the key
    `seed` when a generator's seed differed from the data's; the datamodule logs its own as `data_seed`."""
    import lightning as L
    from lightning.pytorch.loggers import CSVLogger

    from ue_lightning.modules import ErrorMinimizingNoise

    dm = UEDataModule("digits", batch_size=8, train_subset=24, augment=False, seed=0)
    module = ErrorMinimizingNoise(arch="resnet18", width=4, in_channels=1, image_size=8, num_classes=10,
                                  mode="classwise", train_steps=1, max_rounds=1, steps=1, seed=1)
    trainer = L.Trainer(accelerator="cpu", max_epochs=-1, logger=CSVLogger(tmp_path), enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, inference_mode=False)
    trainer.fit(module, datamodule=dm)
    assert dm.hparams["data_seed"] == 0 and "seed" not in dm.hparams and module.hparams["seed"] == 1


def test_train_images_are_the_train_samples_in_order_clean_or_as_the_victim_gets_them(tmp_path):
    """What EM and TUE make noise for (every train sample, val included) and what the SimCLR probe reads (the victim's
    samples, noised as served, without augmentation)."""
    import torch

    from ue_lightning.data import UEDataModule
    from ue_lightning.data.noise_file import NoiseFile, NoiseMetadata

    dm = UEDataModule("digits", val_fraction=0.2, seed=0)
    clean = dm.train_images()
    assert [clean[k][2] for k in range(len(clean))] == dm.train_indices().tolist()
    image, label, index = clean[3]
    assert image.dtype == torch.float32 and 0 <= float(image.min()) and float(image.max()) <= 1
    delta = torch.full((len(dm.clean_split("train")), *dm.clean_split("train").image_shape), 4, dtype=torch.int8)
    path = tmp_path / "noise.safetensors"
    NoiseFile.write(path, delta, NoiseMetadata(method="t", epsilon=8, classwise=False,
                                               fingerprint=dm.clean_split("train").fingerprint()))
    noised = UEDataModule("digits", val_fraction=0.2, seed=0, perturbation=str(path))
    noised.setup("fit")
    victim = noised.train_images("victim", noised=True)
    assert [victim[k][2] for k in range(len(victim))] == noised.victim_indices().tolist()
    first = victim[0]
    plain = noised.train_images("victim")[0]
    assert first[2] == plain[2] and torch.allclose(first[0], (plain[0] * 255 + 4).clamp(0, 255) / 255, atol=1e-6)
