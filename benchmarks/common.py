"""Shared helpers of the CPU benchmarks: data, timing, machine description."""

from __future__ import annotations

import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

SHARED_NPZ = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10-jpeg75-subset.npz"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    return f"{os.cpu_count()} CPU cores ({cpu}), torch {torch.__version__}, {torch.get_num_threads()} threads"


def best_of(fn: Callable[[], float], repeats: int) -> tuple[float, list[float]]:
    """Run ``fn`` (returns seconds) ``repeats`` times; return the median and all timings."""
    times = [fn() for _ in range(repeats)]
    return statistics.median(times), times


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start
