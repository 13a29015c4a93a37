"""The data thief's score model at CPU scale, for ``data.purify_with``: trained on *other* CIFAR-10 images.

    OMP_NUM_THREADS=1 python benchmarks/thief_score.py     # -> runs/score/cifar10-npz-thief/checkpoints/last.ckpt

A thief who purifies protected images needs a score model of clean images of the same kind,
not the protected images' clean originals (which only the data owner has). Here: the 5000
train images of ../shared/data/cifar10-jpeg75-subset.npz *outside* the CPU protocol's
stratified subset (``data.train_subset 5000``, ``data.seed 0``), which no victim or generator
of the protocol reads. The script writes them as the train split of
``benchmarks/out/thief/cifar10-jpeg75-other5000.npz`` (the test split is the shared file's),
a data config naming it (``benchmarks/out/thief/data/cifar10-npz-thief.yaml``), and trains the
shipped CPU score model on it (``configs/score/dsm.yaml`` + ``configs/score/cifar10-npz-cpu/dsm.yaml``:
width 16, sigma 0.1, 8 epochs): about 3 minutes on one thread.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SHARED_NPZ, outside_protocol_subset, save_npz  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "out" / "thief"


def other_images_npz() -> Path:
    """The npz whose train split is the shared file's train images outside the protocol's subset (written once)."""
    path = OUT / "cifar10-jpeg75-other5000.npz"
    if not path.exists():
        with np.load(SHARED_NPZ) as f:
            x, y, x_test, y_test = f["x_train"], f["y_train"], f["x_test"], f["y_test"]
        other = outside_protocol_subset(y)
        save_npz(path, x_train=x[other], y_train=y[other], x_test=x_test, y_test=y_test)
    return path


def main() -> None:
    npz = other_images_npz()
    config = OUT / "data" / "cifar10-npz-thief.yaml"  # its stem names the run: runs/score/cifar10-npz-thief
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(f"# the thief's other 5000 CIFAR-10 images (benchmarks/thief_score.py)\n"
                      f"data:\n  root: {npz}\n  train_subset: null\n")
    command = ["ue", "fit", "--config", str(REPO / "configs/data/cifar10-npz-cpu.yaml"), "--config", str(config),
               "--config", str(REPO / "configs/score/dsm.yaml"),
               "--config", str(REPO / "configs/score/cifar10-npz-cpu/dsm.yaml"),
               "--trainer.enable_progress_bar", "false"]
    print(" ".join(command), flush=True)
    subprocess.run(command, cwd=REPO, check=True)
    print(f"written: {REPO / 'runs/score/cifar10-npz-thief/checkpoints/last.ckpt'}")


if __name__ == "__main__":
    main()
