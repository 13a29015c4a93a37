"""The classifier inside a Lightning checkpoint, read without running code (``weights_only=True``).

Every module of the package that holds a classifier keeps it as ``self.model`` (a
:func:`~ue_lightning.models.build_classifier` network) and saves ``arch``, ``width``,
``num_classes``, ``in_channels`` and ``image_size`` as hyperparameters: victims, EM and
REM/collapse generators alike. That is all it takes to rebuild the classifier.

:func:`read_lightning_checkpoint` and :func:`check_data_facts` hold the checks, and their
wording, that every checkpoint loader of the package shares: TAP's classifier, the surrogate
of ``ue protect`` and :meth:`~ue_lightning.modules.score.ScoreEstimator.load_for`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from .checkpoint_file import (CheckpointError, CheckpointNotFoundError, load_checkpoint_file,  # noqa: F401
                              refuse_url)

def read_lightning_checkpoint(path: str | Path, *, name: str, expected: str, fix: str, prefix: str,
                              required: tuple[str, ...] = ()) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(hyperparameters, state_dict)`` of the Lightning checkpoint at ``path``, read with ``weights_only=True``.

    Args:
        path: a local Lightning checkpoint.
        name: how the user gave it (``classifier_checkpoint``, ``--checkpoint``), for messages.
        expected: the module(s) the checkpoint should come from, for messages.
        fix: how to get a right one, appended to every message.
        prefix: a weight name of the expected module starts with this (``model.``, ``net.``).
        required: hyperparameters the expected module saves.

    Raises: :class:`CheckpointNotFoundError` (no file), :class:`CheckpointError` (unreadable, or
    not a checkpoint of ``expected``).
    """
    ckpt = load_checkpoint_file(path, name=name, fix=fix)
    hp = ckpt.get("hyper_parameters") if isinstance(ckpt, dict) else None
    state = ckpt.get("state_dict") if isinstance(ckpt, dict) else None
    hp = hp if isinstance(hp, dict) else {}
    state = state if isinstance(state, dict) else {}
    if any(k not in hp for k in required) or not any(k.startswith(prefix) for k in state):
        kind = hp.get("_class_path", "an unknown module")
        raise CheckpointError(f"{name} {path} is a checkpoint of {kind}, not of {expected}; {fix}")
    return hp, state


def check_data_facts(hp: dict[str, Any], data: dict[str, Any], *, name: str, fix: str) -> None:
    """Refuse (:class:`CheckpointError`) a checkpoint whose hyperparameters differ from ``data`` (e.g. num_classes)."""
    differ = [f"{k}={hp.get(k)!r} in the checkpoint but {v} in the data" for k, v in data.items() if hp.get(k) != v]
    if differ:
        raise CheckpointError(f"{name} was trained on other data: {'; '.join(differ)}. "
                              f"A checkpoint only serves the data it was trained on; {fix}")


def load_weights(module: torch.nn.Module, state: dict[str, torch.Tensor], *, name: str, what: str,
                 fix: str = "") -> None:
    """``module.load_state_dict(state)`` (strict), a mismatch raised as :class:`CheckpointError` naming both."""
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{name}: weights do not fit {what}: {str(e)[:300]}" + (f"; {fix}" if fix else "")
                              ) from None


def build_checked(build: Callable[[], torch.nn.Module], state: dict[str, torch.Tensor], *, name: str, what: str,
                  fix: str = "") -> torch.nn.Module:
    """``build()`` with the weights ``state``, once its weight names and shapes, built first on the meta device
    (no memory), are found to be ``state``'s.

    A checkpoint's hyperparameters (a width, a class count) decide the size of the module built from them: checked
    this way, a small crafted file cannot make the loader allocate more than the weights the file holds.
    """
    with torch.device("meta"):
        skeleton = build()
    check_fits(skeleton, state, name=name, what=what, fix=fix)
    module = build()
    load_weights(module, state, name=name, what=what, fix=fix)
    return module


def check_fits(skeleton: torch.nn.Module, state: dict[str, Any], *, name: str, what: str, fix: str = "") -> None:
    """Refuse (:class:`CheckpointError`) weights ``state`` whose names or shapes are not those of ``skeleton`` (a
    module built on the meta device from the checkpoint's hyperparameters: no memory), naming a few that differ."""
    expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    given = {k: tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__ for k, v in state.items()}
    if expected != given:
        differ = [f"{k}: {given.get(k, 'missing')} in the file, {expected.get(k, 'none')} in {what}"
                  for k in sorted(set(expected) | set(given)) if expected.get(k) != given.get(k)]
        raise CheckpointError(f"{name}: weights do not fit {what} (its hyperparameters): {len(differ)} differ, e.g. "
                              f"{'; '.join(differ[:3])}" + (f"; {fix}" if fix else ""))


def read_classifier_checkpoint(path: str | Path, *, name: str, expected: str, fix: str
                               ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(hyperparameters, classifier weights)`` of the checkpoint at ``path`` (weights without ``model.``).

    See :func:`read_lightning_checkpoint` for the arguments and errors.
    """
    hp, state = read_lightning_checkpoint(path, name=name, expected=expected, fix=fix, prefix="model.",
                                          required=("arch",))
    return hp, {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
