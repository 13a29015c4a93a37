"""CIFAR python batches written by ``ue export``, read without letting the files run code.

The CIFAR format is a pickle. torchvision reads the original batches safely only because it
checks their MD5 against the published files, which an exported (protected) set can never
match. An export therefore carries a marker file, and the package reads such a folder with
an unpickler that rebuilds nothing but numpy arrays, lists, dicts, strings and numbers.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

#: Written by ``ue export --format cifar`` next to the batches.
EXPORT_MARKER = "ue_lightning_export.json"

_ALLOWED = {
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
}


class _ArraysOnly(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed here (only numpy arrays)")


def unpickle_arrays(f: BinaryIO) -> Any:
    """Unpickle numpy arrays and plain containers only: any other class is refused, so no code runs
    (pickle.UnpicklingError)."""
    return _ArraysOnly(f, encoding="latin1").load()


def load_batch(path: Path) -> dict:
    """One pickled batch, refusing any object but arrays and plain containers."""
    with open(path, "rb") as f:
        try:
            return unpickle_arrays(f)
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as e:
            raise ValueError(f"{path} is not a readable CIFAR batch ({e}); export the data again with "
                             "`ue export --format cifar`") from None


def is_export(folder: Path) -> bool:
    return (Path(folder) / EXPORT_MARKER).is_file()


#: The files a CIFAR-10 or CIFAR-100 export may name in its marker: the batches, in the folder itself.
BATCH_FILES = {*(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta", "train", "test", "meta"}


def load_export(folder: Path, train: bool, cifar100: bool) -> tuple[np.ndarray, list[int], list[str]]:
    """(images uint8 (N, 32, 32, 3), labels, class names) of an exported CIFAR folder.

    Reads only the batch files of ``folder`` itself (:data:`BATCH_FILES`): a marker naming any other path (an
    absolute one, ``../``) is refused, whatever it says.
    """
    folder = Path(folder)
    files = json.loads((folder / EXPORT_MARKER).read_text())["files"]
    strangers = [f for f in files if f not in BATCH_FILES and f != EXPORT_MARKER]
    if strangers:
        raise ValueError(f"{folder / EXPORT_MARKER} names {strangers!r}, not a batch file of the export (only "
                         f"{', '.join(sorted(BATCH_FILES))} in its own folder): export the data again with "
                         "`ue export --format cifar`")
    names = [f for f in files if (f.startswith("data_batch") or f == "train") == train and f not in
             ("batches.meta", "meta")]
    key = "fine_labels" if cifar100 else "labels"
    batches = [load_batch(folder / f) for f in sorted(names)]
    data = np.concatenate([np.asarray(b["data"], dtype=np.uint8) for b in batches]).reshape(-1, 3, 32, 32)
    labels = [int(v) for b in batches for v in b[key]]
    meta = load_batch(folder / ("meta" if cifar100 else "batches.meta"))
    classes = [str(c) for c in meta["fine_label_names" if cifar100 else "label_names"]]
    return data.transpose(0, 2, 3, 1), labels, classes


def write_marker(folder: Path, method: str) -> None:
    files = sorted(p.name for p in Path(folder).iterdir() if p.is_file())
    (Path(folder) / EXPORT_MARKER).write_text(json.dumps({"written_by": "ue export", "method": method,
                                                           "files": files}, indent=2))
