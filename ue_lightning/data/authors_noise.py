"""Noise in the formats the source papers' code releases: read into a noise file, and written from one.

Read off the authors' loaders (their code is never imported or run here):

* ``em``: Huang et al.'s ``perturbation.pt`` (HanxunH/Unlearnable-Examples): a float tensor (R, C, H, W) saved with
  ``torch.save``, R = the train samples (sample-wise) or the classes (class-wise), in units of 1/255 of the pixel
  range (8/255 = 0.0314). Their CIFAR loader (``dataset.py``, ``PoisonCIFAR10``) multiplies it by 255, clamps it to
  [0, 255] (so the negative half of the noise is dropped), adds it to the float32 image, clips to [0, 255] and casts
  to uint8 (truncation).
* ``rem``: Fu et al.'s ``*-def-noise.pkl`` (fshp971/robust-unlearnable-examples): a pickled numpy int8 array
  (N, C, H, W) in 1/255 units; their loader adds it to the uint8 image as int16 and clips to [0, 255]. TUE's code
  (Ren et al.) builds on EM's and reads EM's layout.
* ``apbench``: APBench's poisoned datasets (lafeat/apbench, ``poisons_generate.py``, ``export_poison``): not noise
  but the poisoned train images, one PNG a sample, ``<folder>/data/<index>.png`` in the dataset's order (CIFAR-10/100,
  SVHN; its ImageNet-100 layout, ``<class>/<j>.png`` over a random subset, is not read), written as
  ``round(255 x)``. The noise is each PNG less the clean image: exact for any poison within the budget a noise file
  holds (OPS, which moves a pixel by up to 255, is refused).

Importing applies the authors' rule to the clean images, so the noise file gives the images their loader would
train on, bit for bit for sample-wise noise (class-wise: each class's pattern rounded down to whole grey levels, as
their truncation does for integer pixels). Exporting writes what their loader turns back into this file's images:
``rem`` exactly; ``em`` as (delta + 0.5)/255, so their truncation lands on delta, with the negative half kept (their
CIFAR loader's clamp at 0 would drop it: keep it by clamping to [-255, 255] there, or use ``rem``).
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from ue_lightning.data.cifar_batches import unpickle_arrays
from ue_lightning.data.datasets import CleanImages, load_dataset
from ue_lightning.data.noise_file import MAX_EPSILON, NoiseFile, NoiseMetadata
from ue_lightning.scratch import as_published, scratch_file

Format = Literal["em", "rem"]
FORMATS = ("em", "rem")
#: Formats ``ue import`` reads: the noise files above and APBench's folders of poisoned images.
IMPORT_FORMATS = (*FORMATS, "apbench")
_CHUNK = 4096


def read_authors_noise(path: str | Path, format: Format) -> np.ndarray:
    """The raw array of an authors' noise file: ``em`` float32 (R, C, H, W) in 1/255 units (already times 255),
    ``rem`` int16 (R, C, H, W) in 1/255 units. Refuses anything else in one line naming the fix."""
    path = Path(path)
    if format not in FORMATS:
        raise ValueError(f"format={format!r}: choose em (perturbation.pt) or rem (*-def-noise.pkl)")
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: give the authors' noise file (--source)")
    if format == "em":
        try:  # weights_only: a tensor file, never a pickle that runs code
            raw = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 (torch raises many kinds for a file that is not a tensor)
            raise ValueError(f"{path} is not a tensor file saved with torch.save ({type(e).__name__}); "
                             "an EM perturbation.pt is one float tensor (--format rem reads REM's .pkl)") from None
        if not isinstance(raw, torch.Tensor) or not raw.is_floating_point() or raw.dim() != 4:
            what = f"a {raw.dim()}-D {raw.dtype} tensor" if isinstance(raw, torch.Tensor) else type(raw).__name__
            raise ValueError(f"{path} holds {what}; an EM perturbation.pt is a float tensor (R, C, H, W) in [-1, 1]")
        return raw.float().mul(255).numpy()
    try:
        with open(path, "rb") as f:
            raw = unpickle_arrays(f)
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as e:
        raise ValueError(f"{path} is not a REM noise file (a pickled numpy int8 array; {e}); "
                         "--format em reads EM's perturbation.pt") from None
    if not isinstance(raw, np.ndarray) or raw.dtype != np.int8 or raw.ndim != 4:
        what = f"a {raw.ndim}-D {raw.dtype} array" if isinstance(raw, np.ndarray) else type(raw).__name__
        raise ValueError(f"{path} holds {what}; a REM noise file is an int8 array (N, C, H, W) in 1/255 units")
    return raw.astype(np.int16)


def _is_classwise(raw: np.ndarray, clean: CleanImages, source: Path) -> bool:
    if tuple(raw.shape[1:]) != tuple(clean.image_shape):
        raise ValueError(f"{source} holds noise of shape {tuple(raw.shape[1:])} a row; {clean.name}/{clean.split} "
                         f"images are {tuple(clean.image_shape)} (C, H, W): give the dataset it was made for")
    if raw.shape[0] == len(clean):
        return False
    if raw.shape[0] == clean.num_classes:
        return True
    raise ValueError(f"{source} has {raw.shape[0]} rows: neither the {len(clean)} train samples nor the "
                     f"{clean.num_classes} classes of {clean.name}: give the dataset (and --max_classes) it was made for")


def authors_delta(raw: np.ndarray, format: Format, clean: CleanImages, classwise: bool,
                  negative: Literal["drop", "keep"] = "drop") -> np.ndarray:
    """int16 delta (R, C, H, W) in 1/255 units giving the images the authors' loader makes from ``raw`` (``em``'s
    array is clipped in place)."""
    if format == "em":
        np.clip(raw, 0 if negative == "drop" else -255, 255, out=raw)
    if classwise:  # x + t truncated is x + floor(t) for integer x (1e-3: float32 error of k/255 * 255)
        return (np.floor(raw + 1e-3) if format == "em" else raw).astype(np.int16)
    delta = np.empty(raw.shape, dtype=np.int16)
    for start in range(0, len(raw), _CHUNK):
        rows = slice(start, min(start + _CHUNK, len(raw)))
        x = clean.image_batch(np.arange(rows.start, rows.stop)).numpy()
        if format == "em":  # their loader: float32 add, clip, cast to uint8
            protected = np.clip(x.astype(np.float32) + raw[rows], 0, 255).astype(np.uint8)
        else:  # int16 add, clip
            protected = np.clip(x.astype(np.int16) + raw[rows], 0, 255).astype(np.uint8)
        delta[rows] = protected.astype(np.int16) - x.astype(np.int16)
    return delta


def poisoned_folder_delta(source: str | Path, clean: CleanImages) -> np.ndarray:
    """int16 delta (N, C, H, W) in 1/255 units: APBench's poisoned PNGs (``<source>/data/<index>.png``, or
    ``<source>/<index>.png``) less the clean train images, in index order. Refuses a missing, extra or foreign PNG in
    one line naming the fix."""
    from PIL import Image

    source = Path(source)
    folder = source / "data" if (source / "data").is_dir() else source
    if not folder.is_dir():
        raise FileNotFoundError(f"{source} is not a folder: give APBench's poisoned dataset folder (its data/ holds "
                                "<index>.png)")
    names = {p.name for p in folder.glob("*.png")}
    expected = {f"{i}.png" for i in range(len(clean))}
    if names != expected:
        missing, extra = sorted(expected - names, key=len), sorted(names - expected)
        what = f"{len(missing)} missing (first {missing[0]})" if missing else f"{len(extra)} foreign (first {extra[0]})"
        raise ValueError(f"{folder} holds {len(names)} PNGs, {what}; APBench writes one <index>.png for each of the "
                         f"{len(clean)} {clean.name} train images: give the folder made for this dataset")
    channels, height, width = clean.image_shape
    delta = np.empty((len(clean), *clean.image_shape), dtype=np.int16)
    for start in range(0, len(clean), _CHUNK):
        index = np.arange(start, min(start + _CHUNK, len(clean)))
        x = clean.image_batch(index).numpy().astype(np.int16)
        for row, i in enumerate(index):
            with Image.open(folder / f"{i}.png") as image:
                array = np.asarray(image.convert("L" if channels == 1 else "RGB"))
            if array.shape[:2] != (height, width):
                raise ValueError(f"{folder / f'{i}.png'} is {array.shape[1]}x{array.shape[0]}; {clean.name} images "
                                 f"are {width}x{height}: give the folder made for this dataset")
            delta[start + row] = array.reshape(height, width, channels).transpose(2, 0, 1).astype(np.int16) - x[row]
    return delta


def import_noise(
    source: str,
    output: str,
    dataset: str,
    format: Literal["em", "rem", "apbench"] = "em",
    root: str = "data",
    negative: Literal["drop", "keep"] = "drop",
    method: str | None = None,
    max_classes: int | None = None,
    resize: int | None = None,
) -> Path:
    """Read an authors' noise file (``--format em``: EM's perturbation.pt; ``rem``: REM's .pkl) or APBench's poisoned
    dataset (``apbench``: a folder of ``<index>.png``) into a noise file.

    Args:
        source: the authors' file, or APBench's folder.
        output: the noise file to write (must not exist yet).
        dataset, root, max_classes, resize: the clean train split it was made for, as in UEDataModule.
        negative: ``em`` only: ``drop`` the negative half as EM's CIFAR loader does (its clamp to [0, 255]),
            or ``keep`` it (the signed noise the paper describes).
        method: the name recorded in the file (default ``<format>-imported``).
    """
    out = Path(output)
    if out.exists():
        raise FileExistsError(f"{out} exists; choose a new --output file (nothing was overwritten)")
    if negative not in ("drop", "keep"):
        raise ValueError(f"negative={negative!r}: choose drop (EM's CIFAR loader) or keep")
    if format not in IMPORT_FORMATS:
        raise ValueError(f"format={format!r}: choose em (perturbation.pt), rem (*-def-noise.pkl) or apbench (a folder "
                         "of poisoned PNGs)")
    if format == "apbench":
        clean = load_dataset(dataset, root, True, num_classes=max_classes, resize=resize)
        delta, classwise = poisoned_folder_delta(source, clean), False
    else:
        raw = read_authors_noise(source, format)
        clean = load_dataset(dataset, root, True, num_classes=max_classes, resize=resize)
        classwise = _is_classwise(raw, clean, Path(source))
        delta = authors_delta(raw, format, clean, classwise, negative)
    epsilon = max(1, int(np.abs(delta).max()))
    if epsilon > MAX_EPSILON:
        raise ValueError(f"{source} holds noise of up to {epsilon}/255 as their loader applies it; a noise file holds "
                         f"at most {MAX_EPSILON}/255 (nothing was written): is it the authors' noise for this dataset?")
    metadata = NoiseMetadata(method=method or f"{format}-imported", epsilon=float(epsilon), classwise=classwise,
                             fingerprint=clean.fingerprint(),
                             config={"source": str(source), "format": format, "negative": negative})
    NoiseFile.write(out, delta.astype(np.int8), metadata)
    return out


def export_authors_noise(noise: NoiseFile, output: Path, format: Format) -> Path:
    """Write ``noise`` in an authors' format at ``output`` (atomically): ``rem`` int8 pickle, ``em`` float tensor."""
    if format not in FORMATS:
        raise ValueError(f"format={format!r}: choose em or rem")
    if format == "rem" and noise.classwise:
        raise ValueError(f"{noise.path} is class-wise; REM's loader reads one row a sample: use --format em "
                         "(EM's layout holds class-wise noise)")
    delta = np.asarray(noise.delta)
    fd, tmp = scratch_file(output)
    try:
        with os.fdopen(fd, "wb") as f:
            if format == "rem":
                pickle.dump(np.ascontiguousarray(delta, dtype=np.int8), f, protocol=4)
            else:  # (delta + 0.5)/255: their float32 add and uint8 truncation land on delta exactly
                torch.save(torch.from_numpy((delta.astype(np.float32) + 0.5) / 255), f)
            f.flush()
            os.fsync(f.fileno())
        as_published(tmp)
        tmp.rename(output)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return Path(output)
