"""The classifier inside a Lightning checkpoint, read without running code (``weights_only=True``).

Every module of the package that holds a classifier keeps it as ``self.model`` (a
:func:`~ue_lightning.models.build_classifier` network) and saves ``arch``, ``width``,
``num_classes``, ``in_channels`` and ``image_size`` as hyperparameters: victims, EM and
REM/collapse generators alike. That is all it takes to rebuild the classifier.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from .normalize import ImageClassifier
from .registry import build_classifier

_UNREADABLE = (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError)


def read_classifier_checkpoint(path: str | Path, *, name: str, expected: str, fix: str
                               ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(hyperparameters, classifier weights)`` of the checkpoint at ``path`` (weights without ``model.``).

    Args:
        path: a local Lightning checkpoint.
        name: how the user gave it (``classifier_checkpoint``, ``--checkpoint``), for messages.
        expected: the module(s) the checkpoint should come from, for messages.
        fix: how to get a right one, appended to every message.

    Raises: FileNotFoundError (no file), ValueError (unreadable, or no classifier in it).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{name} {path} does not exist: {fix}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except _UNREADABLE as e:
        raise ValueError(f"cannot read {name} {path}: it is corrupt or not a Lightning checkpoint "
                         f"({type(e).__name__}: {str(e)[:200]}); {fix}") from None
    hp: dict[str, Any] = ckpt.get("hyper_parameters", {}) if isinstance(ckpt, dict) else {}
    state = ckpt.get("state_dict", {}) if isinstance(ckpt, dict) else {}
    weights = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
    if "arch" not in hp or not weights:
        kind = hp.get("_class_path", "an unknown module") if hp else "an unknown module"
        raise ValueError(f"{name} {path} is a checkpoint of {kind}, not of {expected}; {fix}")
    return hp, weights


def classifier_from_weights(hp: dict[str, Any], weights: dict[str, torch.Tensor], *, name: str) -> ImageClassifier:
    """The classifier that ``hp`` (arch, width, num_classes, in_channels, image_size) describes, with ``weights``."""
    model = build_classifier(hp["arch"], hp["num_classes"], in_channels=hp["in_channels"],
                             image_size=hp["image_size"], width=hp.get("width"))
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise ValueError(f"{name}: weights do not fit {hp['arch']} (width={hp.get('width')}): {str(e)[:300]}") from None
    return model
