"""Mode helpers for attacks and passes that run a network without changing it: its train/eval mode and BatchNorm."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from torch import nn


@contextmanager
def batchnorm_statistics_frozen(model: nn.Module) -> Iterator[None]:
    """Within the block, BatchNorm layers in train mode normalise with the batch's statistics
    but do not update their running statistics (nor ``num_batches_tracked``).

    In eval mode nothing changes (running statistics are used and never written). An
    attack that runs the surrogate in train mode (batch statistics, as in its SGD steps)
    thus leaves the model exactly as it found it.
    """
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    for m in layers:
        m.track_running_stats = False  # forward then passes no running buffers: batch statistics, no update
    try:
        yield
    finally:
        for m in layers:
            m.track_running_stats = True


@contextmanager
def in_mode(model: nn.Module, training: bool, frozen: bool = False) -> Iterator[None]:
    """Within the block, ``model`` is in train mode (``training``) or eval mode, and with ``frozen`` its
    parameters do not require gradients; both are restored on exit, an exception included."""
    was_training = model.training
    flags = [p.requires_grad for p in model.parameters()] if frozen else []
    model.train(training)
    if frozen:
        model.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)
        model.train(was_training)
