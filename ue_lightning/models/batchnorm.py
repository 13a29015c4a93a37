"""BatchNorm helpers for attacks that run a network in train mode without changing it."""

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
