"""Reading a checkpoint file safely: local files only, ``torch.load(weights_only=True)``, no hollow tensors.

The file half of :mod:`ue_lightning.models.checkpoint` (what a checkpoint *is* comes there): it needs
nothing of the package, so the noise store and the checkpoint loaders read files the same way without
importing the model registry.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

_UNREADABLE = (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError)


class CheckpointError(ValueError):
    """A checkpoint that is unreadable, of another module, made for other data, or whose weights do not fit."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No checkpoint at the given path (both a :class:`CheckpointError` and a ``FileNotFoundError``)."""


def refuse_url(path: Any, name: str) -> None:
    """Refuse (:class:`CheckpointError`) a checkpoint given as a URL, before anything is fetched.

    A checkpoint is a pickle: Lightning loads remote ones with ``weights_only=False``, which runs
    whatever code the file holds, and torch.hub caches them by file name alone.
    """
    if isinstance(path, str) and "://" in path:
        raise CheckpointError(f"{name} {path} is a URL: a checkpoint is a pickle that can run code when loaded, so "
                              "ue loads local files only; download it from a source you trust and pass the local path")


def load_checkpoint_file(path: str | Path, *, name: str, fix: str, map_location: Any = "cpu",
                         mmap: bool = False) -> Any:
    """What the local checkpoint file at ``path`` holds, read by ``torch.load(weights_only=True)`` alone.

    The one way the package reads a checkpoint: never through a library's path heuristics (Lightning
    sends every path that starts with ``http``, ``http_models/victim.ckpt`` included, to torch.hub,
    which unpickles a same-named cached file). ``mmap``: tensors map the file instead of being read
    (a file in torch's legacy format, which cannot be mapped, is read).

    Raises: :class:`CheckpointNotFoundError` (no file), :class:`CheckpointError` (a URL, or unreadable).
    """
    refuse_url(path, name)
    path = Path(path)
    if not path.is_file():
        raise CheckpointNotFoundError(f"{name} {path} does not exist: {fix}")
    try:
        try:
            ckpt = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
        except RuntimeError as e:
            if not mmap or "mmap" not in str(e):
                raise
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except _UNREADABLE as e:
        # torch's own message advises weights_only=False, which would run the file's code: its first line is kept
        why = str(e).replace("Weights only load failed.", "").strip().splitlines()
        why = next((line for line in why if "weights_only" not in line and line.strip()), "")
        raise CheckpointError(f"{name} {path} is not a readable checkpoint: it is corrupt, truncated, or holds "
                              f"objects other than tensors and plain values (not unpickled, for safety) "
                              f"({type(e).__name__}: {why[:200]}); {fix}") from None
    _refuse_hollow_tensors(ckpt, f"{name} {path}", fix)
    return ckpt


def _refuse_hollow_tensors(value: Any, name: str, fix: str, where: str = "") -> None:
    """Refuse (:class:`CheckpointError`) a tensor that claims more elements than the bytes behind it (a crafted
    view, e.g. stride 0 over one value): copying it (``.float()``, ``.contiguous()``) would allocate them all."""
    if isinstance(value, torch.Tensor):
        nbytes = value.numel() * value.element_size()
        if nbytes > value.untyped_storage().nbytes():
            raise CheckpointError(f"{name} is not a checkpoint ue wrote: {where or 'a tensor'} of shape "
                                  f"{tuple(value.shape)} claims {nbytes} bytes but holds "
                                  f"{value.untyped_storage().nbytes()}; {fix}")
    elif isinstance(value, dict):
        for key, item in value.items():
            _refuse_hollow_tensors(item, name, fix, f"{where}.{key}" if where else str(key))
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _refuse_hollow_tensors(item, name, fix, f"{where}[{i}]")
