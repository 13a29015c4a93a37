"""Choose the fast victim's settings on clean data, never looking at the test set.

    python benchmarks/fast_victim_holdout.py --victim airbench-cpu --seed 0 [-- extra ue fit options]
    python benchmarks/fast_victim_holdout.py --victim resnet18-cpu --seed 0 -- --data.perturbation NOISE_FILE

Trains the victim config on the CPU protocol's 5000-image subset of
../shared/data/cifar10-jpeg75-subset.npz (``data.train_subset 5000``, ``data.seed 0``: the same
images as the protocol's victims) and scores it on the *other* 5000 train images of that file
(a held-out set: the file's test set is not read). The held-out copy is written once to
``benchmarks/out/holdout/cifar10-jpeg75-subset.npz``: x_train = all 10000 train images (so the
subset is the protocol's, and the protocol's noise files apply), x_test = the 5000 outside the subset. One torch thread; prints
and appends one JSON line (options, train and held-out accuracy, minutes of fit + scoring)
to ``benchmarks/out/holdout/results.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (PROTOCOL_SEED, PROTOCOL_SUBSET, QUIET, REPO, SHARED_NPZ, fit_and_test,  # noqa: E402
                    outside_protocol_subset, save_npz)

OUT = REPO / "benchmarks" / "out" / "holdout"


def holdout_npz() -> Path:
    """The npz whose test split is the train images outside the protocol's subset (written once).

    It bears the shared file's name and the same train split, so a noise file of the protocol (keyed on the
    train split: dataset name, pixels, labels) applies to it: ``-- --data.perturbation <noise file>``.
    """
    path = OUT / SHARED_NPZ.name
    if not path.exists():
        with np.load(SHARED_NPZ) as f:
            x, y = f["x_train"], f["y_train"]
        held = outside_protocol_subset(y)
        save_npz(path, x_train=x, y_train=y, x_test=x[held], y_test=y[held])
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--victim", default="airbench-cpu", help="victim config of configs/victim/")
    p.add_argument("--seed", type=int, default=0, help="the victim's seed_everything")
    p.add_argument("extra", nargs="*", help="more ue fit options (after --)")
    a = p.parse_args()
    torch.set_num_threads(1)
    args = ["--config", str(REPO / "configs/data/cifar10-npz-cpu.yaml"),
            "--config", str(REPO / f"configs/victim/{a.victim}.yaml"), "--data.root", str(holdout_npz()),
            "--data.train_subset", str(PROTOCOL_SUBSET), "--data.seed", str(PROTOCOL_SEED), *QUIET,
            "--seed_everything", str(a.seed), "--data.eval_batch_size", "500",
            "--trainer.default_root_dir", str(OUT / "runs"), "--trainer.callbacks", "[]",
            "--trainer.logger", "false", "--trainer.enable_checkpointing", "false",
            "--trainer.check_val_every_n_epoch", "100", *a.extra]
    result = {"victim": a.victim, "seed": a.seed, "options": a.extra, **fit_and_test(args),
              "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d %H:%M")}
    result["heldout_acc"] = result.pop("test_acc")
    print(json.dumps(result))
    with open(OUT / "results.jsonl", "a") as f:
        f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
