"""Shared helpers of the CPU benchmarks: data, timing, machine description."""

from __future__ import annotations

import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

SHARED_NPZ = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10-jpeg75-subset.npz"
#: The CPU protocol's train subset of SHARED_NPZ: ``data.train_subset`` and ``data.seed`` of configs/data/cifar10-npz-cpu.yaml.
PROTOCOL_SUBSET, PROTOCOL_SEED = 5000, 0


def outside_protocol_subset(labels: np.ndarray) -> np.ndarray:
    """Indices of SHARED_NPZ's train images that the CPU protocol's subset leaves out (no victim or generator of
    the protocol saw them): a held-out set, or a thief's own images."""
    from ue_lightning.data.sampling import stratified_subset

    kept = stratified_subset(torch.as_tensor(labels), PROTOCOL_SUBSET, PROTOCOL_SEED).numpy()
    return np.setdiff1d(np.arange(len(labels)), kept)


def save_npz(path: Path, **arrays: np.ndarray) -> None:
    """``np.savez`` through a temporary sibling and a rename: a killed run leaves no half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial.npz")
    np.savez(partial, **arrays)
    partial.replace(path)


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
