"""The noise file: the one format in which protection is exchanged.

A noise file is a `safetensors <https://github.com/huggingface/safetensors>`_ file
(no pickle: loading one never runs code) holding

* ``delta``: int8, shape (N, C, H, W) for sample-wise noise or (K, C, H, W) for
  class-wise noise, in units of 1/255, such that for sample-wise noise
  ``protected_uint8 = clean_uint8 + delta`` holds exactly (rounding done and
  ``clean + delta`` already inside [0, 255]); class-wise noise is added to every
  image of its class and the sum clipped to [0, 255];
* ``covered``: uint8, shape (N,), sample-wise only: 1 where the sample has noise
  (generation over a ``train_subset`` covers only part of the split);
* metadata (one JSON string under the key ``ue_lightning``): format version, method,
  epsilon (1/255 units), dataset, split, N, image shape, class-wise or not, the config
  that made it, and the :class:`DataFingerprint` of the clean data.

Files are written atomically (a temporary file in the same folder, fsync, rename) and
read lazily: ``delta`` is a read-only ``numpy.memmap``, so a file larger than memory
is never loaded whole. The layout is plain safetensors, so ``safetensors.safe_open``
reads these files too.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ue_lightning.data.delta import apply_delta, quantize_delta  # noqa: F401  (part of the noise file's API)
from ue_lightning.scratch import as_published, scratch_file

FORMAT = "ue_lightning.noise"
FORMAT_VERSION = 1
MAX_EPSILON = 64  # 1/255 units: the largest budget a noise file states (as every budget of the package)
_META_KEY = "ue_lightning"
_ALIGN = 8


class NoiseFileError(ValueError):
    """A noise file is unreadable, or does not belong to the data it is applied to."""


@dataclass(frozen=True)
class DataFingerprint:
    """What identifies a clean train split: a noise file is refused on any other.

    ``images_sha256`` hashes the uint8 pixels for in-memory datasets, or the relative
    file paths and sizes for image folders (so that a fingerprint never needs to read
    a whole ImageNet subset).
    """

    dataset: str
    split: str
    num_samples: int
    image_shape: tuple[int, int, int]
    num_classes: int
    labels_sha256: str
    images_sha256: str

    def differences(self, other: "DataFingerprint") -> list[str]:
        """Human-readable list of fields where ``other`` differs from ``self``."""
        out = []
        for key in self.__dataclass_fields__:
            mine, theirs = getattr(self, key), getattr(other, key)
            if key == "image_shape":
                mine, theirs = tuple(mine), tuple(theirs)
            if mine != theirs:
                out.append(f"{key}: file has {mine!r}, data has {theirs!r}")
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DataFingerprint":
        d = dict(d)
        d["image_shape"] = tuple(d["image_shape"])
        return cls(**d)


@dataclass
class NoiseMetadata:
    """Everything a noise file says about itself besides the noise."""

    method: str
    epsilon: float  # L-infinity budget, in 1/255 units
    classwise: bool
    fingerprint: DataFingerprint
    config: dict[str, Any] = field(default_factory=dict)
    format: str = FORMAT
    version: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "NoiseMetadata":
        d = json.loads(text)
        d["fingerprint"] = DataFingerprint.from_dict(d["fingerprint"])
        return cls(**d)


def _header(tensors: dict[str, tuple[str, tuple[int, ...], int]], metadata: dict[str, str]) -> bytes:
    """safetensors header: JSON padded with spaces to a multiple of 8 bytes."""
    entries: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name, (dtype, shape, nbytes) in tensors.items():
        entries[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(entries, separators=(",", ":")).encode()
    text += b" " * (-len(text) % _ALIGN)
    return struct.pack("<Q", len(text)) + text


#: What a malformed header or metadata raises while being read (all become one NoiseFileError).
_MALFORMED = (struct.error, ValueError, KeyError, TypeError, IndexError, AttributeError, OverflowError,
              RecursionError, UnicodeDecodeError)


def _check_extent(name: str, spec: dict, data_bytes: int) -> None:
    """A tensor's shape and offsets: whole non-negative numbers, one byte per element, inside the file."""
    shape, offsets = spec["shape"], spec["data_offsets"]
    if not all(type(v) is int and v >= 0 for v in [*shape, *offsets]) or len(offsets) != 2:
        raise ValueError(f"{name}: shape {shape} and offsets {offsets} must be non-negative integers")
    begin, end = offsets
    if not begin <= end <= data_bytes or end - begin != math.prod(shape):
        raise ValueError(f"{name}: offsets {offsets} do not hold shape {shape} within {data_bytes} data bytes")


def _check_metadata_types(m: "NoiseMetadata") -> None:
    """Types a stranger's file could get wrong and that later code would trip over."""
    fp = m.fingerprint
    if not (isinstance(m.method, str) and isinstance(m.classwise, bool) and isinstance(m.version, int)
            and isinstance(m.epsilon, (int, float)) and not isinstance(m.epsilon, bool) and 0 < m.epsilon <= MAX_EPSILON):
        raise ValueError("method, classwise, version or epsilon (1/255, in (0, 64]) has the wrong type or value")
    if not (isinstance(fp.num_samples, int) and isinstance(fp.num_classes, int)
            and all(type(v) is int and v > 0 for v in fp.image_shape) and len(fp.image_shape) == 3):
        raise ValueError("the fingerprint's sample count, class count or image shape is malformed")


class NoiseFileWriter:
    """Writes a noise file atomically, in place, without holding the noise in memory.

    Usage::

        with NoiseFileWriter(path, shape, metadata) as w:
            w.delta[indices] = delta_int8_numpy   # a writable memmap
            w.covered[indices] = 1

    On normal exit the temporary file is flushed, fsynced and renamed to ``path``; on
    an exception it is deleted and ``path`` is left as it was.
    """

    def __init__(self, path: str | os.PathLike, shape: tuple[int, int, int, int], metadata: NoiseMetadata):
        self.path = Path(path)
        self.shape = tuple(int(s) for s in shape)
        if len(self.shape) != 4:
            raise ValueError(f"delta must have shape (N or K, C, H, W), got {self.shape}")
        self.metadata = metadata
        n_delta = int(np.prod(self.shape))
        n_covered = 0 if metadata.classwise else self.shape[0]
        tensors = {"delta": ("I8", self.shape, n_delta)}
        if n_covered:
            tensors["covered"] = ("U8", (n_covered,), n_covered)
        self._header = _header(tensors, {_META_KEY: metadata.to_json(), "format": FORMAT})
        self._n_delta, self._n_covered = n_delta, n_covered

    def __enter__(self) -> "NoiseFileWriter":
        fd, self._tmp = scratch_file(self.path)
        with os.fdopen(fd, "wb") as f:
            f.write(self._header)
            f.truncate(len(self._header) + self._n_delta + self._n_covered)
        start = len(self._header)
        self.delta = np.memmap(self._tmp, dtype=np.int8, mode="r+", offset=start, shape=self.shape)
        self.covered = (
            np.memmap(self._tmp, dtype=np.uint8, mode="r+", offset=start + self._n_delta, shape=(self._n_covered,))
            if self._n_covered
            else None
        )
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self.delta.flush()
                if self.covered is not None:
                    self.covered.flush()
        finally:
            del self.delta, self.covered
        if exc_type is not None:
            self._tmp.unlink(missing_ok=True)
            return
        with open(self._tmp, "rb+") as f:
            os.fsync(f.fileno())
        as_published(self._tmp)
        os.replace(self._tmp, self.path)


class NoiseFile:
    """A noise file opened for reading (lazily: ``delta`` is a read-only memmap)."""

    def __init__(self, path: Path, metadata: NoiseMetadata, delta: np.ndarray, covered: np.ndarray | None):
        self.path = path
        self.metadata = metadata
        self.delta = delta
        self.covered = covered

    # ----------------------------------------------------------------- writing
    @staticmethod
    def write(
        path: str | os.PathLike,
        delta: Tensor | np.ndarray,
        metadata: NoiseMetadata,
        covered: Tensor | np.ndarray | None = None,
    ) -> "NoiseFile":
        """Write a whole int8 delta (already in 1/255 units) atomically and reopen it."""
        delta = delta.detach().cpu().numpy() if isinstance(delta, Tensor) else np.asarray(delta)
        if delta.dtype != np.int8:
            raise TypeError(f"delta must be int8 in 1/255 units (see quantize_delta), got {delta.dtype}")
        with NoiseFileWriter(path, delta.shape, metadata) as w:
            w.delta[:] = delta
            if w.covered is not None:
                w.covered[:] = 1 if covered is None else np.asarray(
                    covered.cpu() if isinstance(covered, Tensor) else covered, dtype=np.uint8)
        return NoiseFile.open(path)

    # ----------------------------------------------------------------- reading
    @classmethod
    def open(cls, path: str | os.PathLike) -> "NoiseFile":
        """Open a noise file, refusing anything that is not one with a clear message."""
        path = Path(path)
        if not path.is_file():
            raise NoiseFileError(f"noise file {path} does not exist: generate one with `ue predict` "
                                 "(see configs/generator/) or check the `perturbation` path.")
        size = path.stat().st_size
        hint = "it is corrupt or not a ue_lightning noise file; regenerate it with `ue predict`"
        try:
            with open(path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                if n > min(size - 8, 100_000_000):
                    raise ValueError("header length past the end of the file")
                header = json.loads(f.read(n))
            metadata = NoiseMetadata.from_json(header["__metadata__"][_META_KEY])
            _check_metadata_types(metadata)
        except _MALFORMED as e:
            raise NoiseFileError(f"cannot read {path}: {hint} ({e})") from None
        if metadata.format != FORMAT or metadata.version > FORMAT_VERSION:
            raise NoiseFileError(f"{path} has format {metadata.format} v{metadata.version}; this ue_lightning "
                                 f"reads {FORMAT} up to v{FORMAT_VERSION}: upgrade ue_lightning.")
        start = 8 + n
        try:
            spec = header["delta"]
            if spec["dtype"] != "I8" or len(spec["shape"]) != 4:
                raise ValueError(f"delta is {spec['dtype']} {spec['shape']}, expected I8 of rank 4")
            _check_extent("delta", spec, size - start)
            if "covered" in header:
                if header["covered"]["dtype"] != "U8" or len(header["covered"]["shape"]) != 1:
                    raise ValueError("covered must be U8 of rank 1")
                _check_extent("covered", header["covered"], size - start)
            end = max(v["data_offsets"][1] for k, v in header.items() if k != "__metadata__")
            if start + end != size:
                raise ValueError(f"file is {size} bytes, header promises {start + end}")
            shape = tuple(spec["shape"])
            if "covered" in header and header["covered"]["shape"] != [shape[0]]:  # export indexes it by row
                raise ValueError(f"covered holds {header['covered']['shape'][0]} flags for {shape[0]} delta rows")
            delta = np.memmap(path, dtype=np.int8, mode="r", offset=start + spec["data_offsets"][0], shape=shape)
            covered = None
            if "covered" in header:
                c = header["covered"]
                covered = np.memmap(path, dtype=np.uint8, mode="r", offset=start + c["data_offsets"][0],
                                    shape=tuple(c["shape"]))
        except _MALFORMED as e:
            raise NoiseFileError(f"cannot read {path}: {hint} ({type(e).__name__}: {e})") from None
        return cls(path, metadata, delta, covered)

    # ----------------------------------------------------------------- checks
    @property
    def classwise(self) -> bool:
        return self.metadata.classwise

    def check_matches(self, fingerprint: DataFingerprint) -> None:
        """Refuse this file for data with another fingerprint, naming what differs."""
        mine = self.metadata.fingerprint
        diffs = mine.differences(fingerprint)
        expected_rows = mine.num_classes if self.classwise else mine.num_samples
        if self.delta.shape != (expected_rows, *mine.image_shape):
            diffs.append(f"delta shape {tuple(self.delta.shape)} does not match its metadata "
                         f"({expected_rows}, {', '.join(map(str, mine.image_shape))})")
        if diffs:
            raise NoiseFileError(
                f"noise file {self.path} was made for other data ({mine.dataset}/{mine.split}); it cannot be "
                "applied here:\n  - " + "\n  - ".join(diffs)
                + "\nGenerate noise for this dataset (same dataset, split and image size) with `ue predict`."
            )

    def check_budget(self) -> None:
        """Refuse a file whose delta exceeds its stated epsilon (reads the whole file once, in chunks).

        ``quantize_delta`` never writes such a file: it was damaged or edited, and training on
        it would measure something else than the budget the file claims.
        """
        largest, bound = self.max_abs(), math.floor(self.metadata.epsilon + 1e-6)
        if largest > bound:
            raise NoiseFileError(f"noise file {self.path} holds |delta| up to {largest}/255 but says epsilon "
                                 f"{self.metadata.epsilon:g}/255: it is damaged or was edited; regenerate it with "
                                 "`ue predict` or get it again from its publisher")

    def delta_for(self, indices: Tensor | np.ndarray, labels: Tensor | np.ndarray) -> Tensor:
        """int8 delta rows (B, C, H, W) for samples ``indices`` with class ``labels``."""
        rows = np.asarray(labels if self.classwise else indices, dtype=np.int64)
        return torch.from_numpy(np.ascontiguousarray(self.delta[rows]))

    def max_abs(self, chunk: int = 4096) -> int:
        """Largest |delta| in the file (1/255 units), read in chunks."""
        return max((int(np.abs(self.delta[i:i + chunk].astype(np.int16)).max()) for i in range(0, len(self.delta), chunk)),
                   default=0)

    def __repr__(self) -> str:
        m = self.metadata
        kind = "class-wise" if m.classwise else "sample-wise"
        return (f"NoiseFile({self.path}, {m.method}, {kind}, eps={m.epsilon:g}/255, "
                f"{m.fingerprint.dataset}/{m.fingerprint.split}, delta {tuple(self.delta.shape)})")
