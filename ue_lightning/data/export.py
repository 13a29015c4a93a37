"""Export a noise file as a protected dataset that can be published as is.

Three layouts: a PNG ImageFolder tree (``train/<class>/<index>.png`` protected,
``val/<class>/<index>.png`` clean), readable by torchvision's ImageFolder and by
``UEDataModule(dataset="folder")``; and CIFAR's python-batch layout
(``cifar-10-batches-py/data_batch_1..5``, ``test_batch``, ``batches.meta``; CIFAR-100:
``cifar-100-python/train``, ``test``, ``meta``), read back by ``UEDataModule`` (which knows an
export by its marker file and unpickles arrays only: :mod:`ue_lightning.data.cifar_batches`);
torchvision's CIFAR classes refuse it as it is (their MD5 list is of the published files); and APBench's
poisoned-dataset folder (``data/<index>.png``, the protected train split only), which APBench's training reads.
Both are written into a temporary folder and renamed into place, so a failed export
leaves nothing half-written at ``output``.
"""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path
from typing import Callable, Literal

import numpy as np
import torch
from PIL import Image

from ue_lightning.console import progress
from ue_lightning.data.authors_noise import FORMATS, export_authors_noise
from ue_lightning.data.cifar_batches import write_marker
from ue_lightning.data.datasets import CleanImages, load_dataset
from ue_lightning.data.noise_file import NoiseFile, apply_delta
from ue_lightning.scratch import as_published, scratch_dir


def protected_images(clean: CleanImages, noise: NoiseFile, chunk: int = 1024):
    """Yield ``(indices, uint8 images (B, C, H, W), labels)`` of the protected split, in order.

    Samples the noise file does not cover (generation over a ``train_subset``) stay clean.
    """
    for start in range(0, len(clean), chunk):
        idx = np.arange(start, min(start + chunk, len(clean)))
        images = clean.image_batch(idx)
        labels = clean.targets[idx]
        delta = noise.delta_for(idx, labels.numpy())
        if noise.covered is not None:
            delta = delta * torch.from_numpy(np.asarray(noise.covered[idx]) > 0).view(-1, 1, 1, 1).to(torch.int8)
        yield idx, apply_delta(images, delta), labels


def _save_png(image: torch.Tensor, path: Path) -> None:
    array = image.permute(1, 2, 0).numpy()
    Image.fromarray(array[..., 0] if array.shape[2] == 1 else array).save(path)


def folder_names(class_names: list[str]) -> list[str]:
    """The class names as folder names, refused unless each is one plain, distinct path component.

    Class names come from the data (an npz's ``class_names``, a stranger's file): ``../x``
    or ``/tmp/x`` would write outside the output folder.
    """
    bad = [n for n in class_names if not n or n in (".", "..") or any(c in n for c in "/\\\0") or n != n.strip()]
    if bad:
        raise ValueError(f"class names {bad!r} cannot be folder names (a path separator, '..', an empty or padded "
                         "name): rename the classes in the dataset (e.g. the npz's class_names) and export again")
    if len(set(class_names)) != len(class_names):
        raise ValueError(f"class names {class_names!r} repeat: two classes would share a folder; rename them")
    return list(class_names)


def _write_png_tree(out: Path, clean_train: CleanImages, clean_test: CleanImages, noise: NoiseFile,
                    advance: Callable[[int], object]) -> None:
    names = folder_names(clean_train.class_names)
    for split in ("train", "val"):
        for name in names:
            (out / split / name).mkdir(parents=True, exist_ok=True)
    for idx, images, labels in protected_images(clean_train, noise):
        for i, image, label in zip(idx.tolist(), images, labels.tolist()):
            _save_png(image, out / "train" / names[label] / f"{i:07d}.png")
        advance(len(idx))
    for start in range(0, len(clean_test), 1024):
        idx = np.arange(start, min(start + 1024, len(clean_test)))
        for i, image, label in zip(idx.tolist(), clean_test.image_batch(idx), clean_test.targets[idx].tolist()):
            _save_png(image, out / "val" / names[label] / f"{i:07d}.png")
        advance(len(idx))


def _write_cifar_batches(out: Path, clean_train: CleanImages, clean_test: CleanImages, noise: NoiseFile,
                         cifar100: bool, advance: Callable[[int], object]) -> None:
    if clean_train.image_shape != (3, 32, 32):
        raise ValueError(f"the CIFAR layout holds 3x32x32 images; this dataset has {clean_train.image_shape}: "
                         "use --format png")
    chunks = []
    for idx, images, _ in protected_images(clean_train, noise):
        chunks.append(images)
        advance(len(idx))
    train = torch.cat(chunks)
    labels = clean_train.targets.tolist()
    test = clean_test.image_batch(np.arange(len(clean_test)))
    advance(len(test))

    def dump(path: Path, images: torch.Tensor, targets: list[int], tag: str) -> None:
        key = "fine_labels" if cifar100 else "labels"  # str keys, as torchvision's latin1 load yields
        with open(path, "wb") as f:
            pickle.dump({"batch_label": tag, key: targets, "data": images.reshape(len(images), -1).numpy(),
                         "filenames": [f"{i:07d}.png" for i in range(len(images))]}, f)

    if cifar100:
        folder = out / "cifar-100-python"
        folder.mkdir(parents=True)
        dump(folder / "train", train, labels, "protected training batch")
        dump(folder / "test", test, clean_test.targets.tolist(), "testing batch")
        with open(folder / "meta", "wb") as f:
            pickle.dump({"fine_label_names": clean_train.class_names}, f)
        write_marker(folder, noise.metadata.method)
        return
    folder = out / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    bounds = np.linspace(0, len(train), 6).astype(int)
    for b in range(5):
        lo, hi = bounds[b], bounds[b + 1]
        dump(folder / f"data_batch_{b + 1}", train[lo:hi], labels[lo:hi], f"protected training batch {b + 1} of 5")
    dump(folder / "test_batch", test, clean_test.targets.tolist(), "testing batch 1 of 1")
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": clean_train.class_names, "num_cases_per_batch": int(bounds[1])}, f)
    write_marker(folder, noise.metadata.method)


def _write_apbench_folder(out: Path, clean_train: CleanImages, noise: NoiseFile, advance: Callable[[int], None]) -> None:
    """APBench's poisoned-dataset layout (lafeat/apbench ``export_poison``): ``data/<index>.png`` a train sample."""
    folder = out / "data"
    folder.mkdir(parents=True)
    for idx, images, _ in protected_images(clean_train, noise):
        for i, image in zip(idx, images):
            _save_png(image, folder / f"{i}.png")
        advance(len(idx))


def export_protected(
    noise: str,
    output: str,
    dataset: str,
    root: str = "data",
    format: Literal["png", "cifar", "em", "rem", "apbench"] = "png",
    max_classes: int | None = None,
    resize: int | None = None,
) -> Path:
    """Write the protected train split (and the clean test split) of ``dataset`` to ``output``, or the noise alone
    in an authors' format.

    Args:
        noise: the noise file (``ue predict`` output); it must match the dataset.
        output: folder to create (must not exist yet); for ``em`` and ``rem`` the file to write.
        dataset, root, max_classes, resize: the clean data, as in UEDataModule.
        format: ``png`` (ImageFolder tree), ``cifar`` (CIFAR python batches; 3x32x32 only), ``apbench`` (APBench's
            poisoned-dataset folder: ``data/<index>.png``, the protected train images only), or the noise for the
            authors' code: ``em`` (EM's perturbation.pt), ``rem`` (REM's .pkl) (:mod:`.authors_noise`).
    """
    out = Path(output)
    if out.exists():
        raise FileExistsError(f"{out} exists; choose a new --output {'file' if format in FORMATS else 'folder'} "
                              "(nothing was overwritten)")
    clean_train = load_dataset(dataset, root, True, num_classes=max_classes, resize=resize)
    noise_file = NoiseFile.open(noise)
    noise_file.check_matches(clean_train.fingerprint())
    noise_file.check_budget()
    if format in FORMATS:
        return export_authors_noise(noise_file, out, format)
    clean_test = None if format == "apbench" else load_dataset(dataset, root, False, num_classes=max_classes,
                                                               resize=resize)
    if format == "png":
        folder_names(clean_train.class_names)  # before anything is written
    if format not in ("png", "cifar", "apbench"):
        raise ValueError(f"format={format!r}: choose png, cifar, apbench, em or rem")
    tmp = scratch_dir(out)
    try:
        total = len(clean_train) + (len(clean_test) if clean_test is not None else 0)
        with progress(desc=f"export ({format})", total=total, unit="image") as bar:
            if format == "png":
                _write_png_tree(tmp, clean_train, clean_test, noise_file, bar.update)
            elif format == "apbench":
                _write_apbench_folder(tmp, clean_train, noise_file, bar.update)
            else:
                _write_cifar_batches(tmp, clean_train, clean_test, noise_file, dataset == "cifar100", bar.update)
        as_published(tmp)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    uncovered = 0 if noise_file.covered is None else int((np.asarray(noise_file.covered) == 0).sum())
    note = f" ({uncovered} samples not covered by the noise file were exported clean)" if uncovered else ""
    test = f" and {len(clean_test)} clean test images" if clean_test is not None else ""
    print(f"exported {len(clean_train)} protected train images{test} to {out} ({format}){note}")
    return out
