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

REPO = Path(__file__).resolve().parents[1]
SHARED_NPZ = REPO.parent / "shared" / "data" / "cifar10-jpeg75-subset.npz"
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
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


def victim_args(victim: str, seed: int, root: str | Path, radius: float = 0.0) -> list[str]:
    """``ue fit`` options of one CPU-protocol victim (configs/victim/<victim>.yaml on the 5000-image subset, no
    checkpoints, no validation pass; PGD AT with 3 steps of rho_a / 2 if ``radius`` > 0, in 1/255): the settings of
    grids/cpu-table1.yaml's CIFAR-10 cells."""
    return ["--config", str(REPO / "configs/data/cifar10-npz-cpu.yaml"), "--config",
            str(REPO / f"configs/victim/{victim}.yaml"), "--data.root", str(SHARED_NPZ), *QUIET,
            "--seed_everything", str(seed), "--data.eval_batch_size", "500", "--trainer.default_root_dir", str(root),
            "--trainer.callbacks", "[]", "--trainer.enable_checkpointing", "false",
            "--trainer.check_val_every_n_epoch", "100", "--model.init_args.adv_radius", str(radius),
            "--model.init_args.adv_steps", "3", "--model.init_args.adv_step_size", str(radius / 2)]


def fit_and_test(args: list[str]) -> dict:
    """Fit and test one victim in this process through the package's CLI (``ue fit`` ARGS, then test): train and
    clean test accuracy, wall and CPU minutes."""
    from ue_lightning.cli import build_cli

    cli = build_cli(args, run=False)
    start, cpu = time.time(), time.process_time()
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    train_acc = float(cli.trainer.callback_metrics["train/acc"])
    test_acc = float(cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)[0]["test/acc"])
    return {"train_acc": train_acc, "test_acc": test_acc, "minutes": round((time.time() - start) / 60, 2),
            "cpu_minutes": round((time.process_time() - cpu) / 60, 2)}  # the process's CPU time: less load-bound
