"""Fake data written in the real on-disk formats, and helpers to run the `ue` CLI."""

from __future__ import annotations

import hashlib
import os
import pickle
import re
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import lightning as L
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
REPO = Path(__file__).resolve().parents[1]


def cpu_trainer(root: Path | str | None = None, **overrides) -> L.Trainer:
    """A quiet one-process CPU Trainer (no logger, checkpoints, bars or summary; gradients allowed in predict and
    test, which the generators' PGD needs); ``overrides`` are any other Trainer arguments."""
    args = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, inference_mode=False, default_root_dir=root)
    return L.Trainer(**{**args, **overrides})


def shipped(data: str, *methods: str) -> list[str]:
    """The shipped configs of a run, in merge order: ``configs/data/<data>.yaml``, then each
    ``configs/<method>.yaml`` (e.g. ``generator/rem``) followed by its overlay for that data where there is one."""
    from ue_lightning.compose import compose

    return compose(REPO / "configs" / "data" / f"{data}.yaml", *(REPO / "configs" / f"{m}.yaml" for m in methods))


def config_args(*configs: str | Path) -> list[str]:
    """``--config C`` for each config, in order."""
    return [arg for config in configs for arg in ("--config", str(config))]


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def write_fake_cifar(root: Path, name: str = "cifar10", n_per_batch: int = 20, n_test: int = 40, seed: int = 0) -> Path:
    """CIFAR python batches exactly as torchvision reads them; returns ``root``."""
    rng = np.random.default_rng(seed)
    classes = 10 if name == "cifar10" else 100
    folder = root / ("cifar-10-batches-py" if name == "cifar10" else "cifar-100-python")
    folder.mkdir(parents=True, exist_ok=True)
    label_key = "labels" if name == "cifar10" else "fine_labels"

    def batch(path: Path, n: int) -> None:
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = (np.arange(n) % classes).tolist()
        with open(path, "wb") as f:
            pickle.dump({"data": data, label_key: labels, "batch_label": "fake"}, f)

    if name == "cifar10":
        for i in range(1, 6):
            batch(folder / f"data_batch_{i}", n_per_batch)
        batch(folder / "test_batch", n_test)
        meta = {"label_names": [f"class{i}" for i in range(10)]}
        with open(folder / "batches.meta", "wb") as f:
            pickle.dump(meta, f)
    else:
        batch(folder / "train", n_per_batch * 5)
        batch(folder / "test", n_test)
        with open(folder / "meta", "wb") as f:
            pickle.dump({"fine_label_names": [f"class{i}" for i in range(100)]}, f)
    return root


@pytest.fixture
def fake_cifar10(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A CIFAR-10 root (100 train, 40 test images) whose md5 sums torchvision accepts."""
    from torchvision.datasets import CIFAR10

    root = write_fake_cifar(tmp_path / "cifar")
    folder = root / CIFAR10.base_folder
    monkeypatch.setattr(CIFAR10, "train_list", [[f, _md5(folder / f)] for f, _ in CIFAR10.train_list])
    monkeypatch.setattr(CIFAR10, "test_list", [[f, _md5(folder / f)] for f, _ in CIFAR10.test_list])
    monkeypatch.setattr(CIFAR10, "meta", {**CIFAR10.meta, "md5": _md5(folder / CIFAR10.meta["filename"])})
    return root


def write_fake_image_folder(root: Path, classes: int = 4, per_class: int = 6, per_class_val: int = 2,
                            size: tuple[int, int] = (40, 30), seed: int = 0) -> Path:
    """An ImageFolder tree root/{train,val}/<wnid>/*.JPEG with RGB and greyscale images."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", per_class), ("val", per_class_val)):
        for c in range(classes):
            folder = root / split / f"n{c:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                array = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
                img = Image.fromarray(array)
                if i == 0:
                    img = img.convert("L")  # ImageNet has a few greyscale JPEGs
                img.save(folder / f"img_{i}.JPEG", quality=90)
    return root


@pytest.fixture
def fake_image_folder(tmp_path: Path) -> Path:
    return write_fake_image_folder(tmp_path / "imagenet")


@pytest.fixture
def fake_npz(tmp_path: Path) -> Path:
    """A small .npz in the layout of ../shared/data/cifar10-jpeg75-subset.npz (NHWC uint8)."""
    rng = np.random.default_rng(0)
    path = tmp_path / "tiny.npz"
    np.savez(path, x_train=rng.integers(0, 256, (60, 16, 16, 3), dtype=np.uint8), y_train=np.arange(60) % 10,
             x_test=rng.integers(0, 256, (30, 16, 16, 3), dtype=np.uint8), y_test=np.arange(30) % 10)
    return path


#: Trainer settings that make each stage tiny (the digits, 1 thread: the test runs in well under a minute).
TINY = {
    "score": {"trainer": {"max_epochs": 1, "limit_train_batches": 2, "limit_val_batches": 1, "log_every_n_steps": 1}},
    "em-classwise": {"model": {"init_args": {"train_steps": 2, "max_rounds": 1}},
                     "trainer": {"log_every_n_steps": 1}},
    "tue": {"model": {"init_args": {"train_steps": 2, "steps": 2}},
            "trainer": {"max_epochs": 1, "limit_train_batches": 2, "log_every_n_steps": 1}},
    "collapse": {"model": {"init_args": {"steps": 1, "adv_steps": 1, "eot_samples": 1}},
                 "trainer": {"max_steps": 2, "log_every_n_steps": 1}},
    "victim": {"trainer": {"max_epochs": 1, "limit_train_batches": 2, "limit_val_batches": 1, "log_every_n_steps": 1}},
}
#: Each stage's shipped configs; `ue pipeline` composes the first three with the digits data and its overlays.
SOURCES = {"score": ["score/dsm"], "em-classwise": ["generator/em-classwise"], "tue": ["generator/tue"],
           "collapse": ["generator/rem", "generator/collapse"], "victim": ["victim/digits"]}


def tiny_pipeline_configs(folder: Path) -> dict[str, list[str]]:
    """Each `ue pipeline` stage's configs (score, em-classwise, tue, collapse, victim), then one making it tiny."""
    paths = {}
    for name, sources in SOURCES.items():
        tiny = folder / f"{name}.yaml"
        tiny.write_text(yaml.safe_dump(TINY[name]))
        paths[name] = [*(str(REPO / "configs" / f"{source}.yaml") for source in sources), str(tiny)]
    return paths


@contextmanager
def memory_cap(extra_bytes: int) -> Iterator[None]:
    """At most ``extra_bytes`` more address space for this process meanwhile (the soft RLIMIT_AS, restored after):
    an allocation beyond it fails at once instead of taking the machine's memory."""
    resource = pytest.importorskip("resource")
    status = Path("/proc/self/status")
    if not status.is_file():
        pytest.skip("reads the process's address space from /proc")
    used = next(int(line.split()[1]) * 1024 for line in status.read_text().splitlines() if line.startswith("VmSize"))
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (used + extra_bytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


#: What a warning looks like on the console: Python's "file.py:12: Category: message" and Lightning's
#: "file.py:12: message" (its rank_zero_warn drops the category); Lightning's tips; a traceback.
CONSOLE_NOISE = re.compile(r"\.py:\d+: |Warning|warn|deprecat|Tip:|Traceback", re.IGNORECASE)


def run_console(*args: str, cwd: Path, threads: int = 1) -> str:
    """``python -m ue_lightning.cli ARGS`` at ``threads`` threads as a user runs it (no PYTHONWARNINGS, unlike
    :func:`run_ue`): its stdout and stderr, interleaved as printed; fails the test on a non-zero exit."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    env.update(OMP_NUM_THREADS=str(threads), PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "ue_lightning.cli", *args], cwd=cwd, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300)
    assert proc.returncode == 0, proc.stdout[-5000:]
    return proc.stdout


#: Commands :func:`run_ue` runs in the test's own process when they use one device: each subprocess spent
#: seconds importing torch and Lightning (with the in-process user-error cases, a fifth of the suite's time:
#: 439 -> 360 s on one machine). `python -m ue_lightning.cli` is ``cli.main``; the console, DDP, grid and
#: entry-point tests keep their subprocesses.
IN_PROCESS = {"fit", "validate", "test", "predict", "export"}


def run_ue(*args: str, cwd: Path | None = None, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``ue ARGS`` (``python -m ue_lightning.cli``) as a user would; fail the test with its output on error.

    A one-device fit, validate, test, predict or export runs in this process (``env``'s ``OMP_NUM_THREADS`` as
    torch's thread count, warnings ignored, stdout and stderr captured); anything else in a subprocess."""
    devices = args[list(args).index("--trainer.devices") + 1] if "--trainer.devices" in args else "1"
    if args and args[0] in IN_PROCESS and devices == "1":
        return _run_ue_in_process(args, cwd, env or {})
    full_env = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
    if devices != "1":
        full_env.setdefault("OMP_NUM_THREADS", "1")  # two processes on two cores: no oversubscription
    proc = subprocess.run([sys.executable, "-m", "ue_lightning.cli", *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(f"ue {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def _run_ue_in_process(args: tuple[str, ...], cwd: Path | None, env: dict) -> subprocess.CompletedProcess:
    import io
    import warnings
    from contextlib import redirect_stderr, redirect_stdout

    import ue_lightning.cli as cli

    saved_env = dict(os.environ)  # also what the run sets itself (seed_everything's PL_GLOBAL_SEED)
    threads, here = torch.get_num_threads(), os.getcwd()
    out, err, code = io.StringIO(), io.StringIO(), 0
    os.environ.update(env)
    if "OMP_NUM_THREADS" in env:
        torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
    try:
        if cwd is not None:
            os.chdir(cwd)
        with warnings.catch_warnings(), redirect_stdout(out), redirect_stderr(err):
            warnings.simplefilter("ignore")
            try:
                cli.main(list(args))
            except SystemExit as stop:
                code = stop.code if isinstance(stop.code, int) else 1
    finally:
        os.chdir(here)
        torch.set_num_threads(threads)
        os.environ.clear()
        os.environ.update(saved_env)
    if code != 0:
        pytest.fail(f"ue {' '.join(args)} failed ({code}):\n{out.getvalue()[-3000:]}\n{err.getvalue()[-5000:]}")
    return subprocess.CompletedProcess(["ue", *args], 0, out.getvalue(), err.getvalue())
