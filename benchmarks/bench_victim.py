"""Victim training throughput: VictimClassifier under Lightning against a bare PyTorch loop.

    python benchmarks/bench_victim.py [--width 16] [--batch 128] [--steps 40] [--repeats 3]

Both train the same model (ResNet-18 CIFAR form) with the same SGD, the same batches
from the same UEDataModule loader (real CIFAR-10 subset when ../shared/data has it,
else random images), on the CPU. Timed: `steps` optimiser steps after `warmup` steps.
Lightning runs with progress bar, checkpointing and model summary off and the default
logger on (the victim logs its loss every step and a torchmetrics accuracy).
Goal: Lightning throughput >= 0.95 of the bare loop.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import lightning as L
import torch
import torch.nn.functional as F

from common import SHARED_NPZ, machine
from ue_lightning.data import UEDataModule
from ue_lightning.modules import VictimClassifier


class StepTimer(L.Callback):
    """Wall time of the optimiser steps after the first ``warmup``."""

    def __init__(self, warmup: int):
        self.warmup, self.start, self.end = warmup, None, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.warmup and self.start is None:
            self.start = time.perf_counter()

    def on_train_end(self, trainer, pl_module):
        self.end = time.perf_counter()


def data(batch: int) -> UEDataModule:
    if SHARED_NPZ.is_file():
        dm = UEDataModule("npz", root=str(SHARED_NPZ), batch_size=batch, train_subset=5000)
    else:
        dm = UEDataModule("digits", batch_size=batch)
    dm.setup("fit")
    return dm


def lightning_run(dm: UEDataModule, width: int, steps: int, warmup: int) -> float:
    torch.manual_seed(0)
    model = VictimClassifier(arch="resnet18", num_classes=dm.num_classes, in_channels=dm.in_channels,
                             image_size=dm.image_size, width=width)
    timer = StepTimer(warmup)
    with tempfile.TemporaryDirectory() as d:
        trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=warmup + steps, enable_progress_bar=False,
                            enable_checkpointing=False, enable_model_summary=False, num_sanity_val_steps=0,
                            limit_val_batches=0, default_root_dir=d, callbacks=[timer], logger=True)
        trainer.fit(model, train_dataloaders=dm.train_dataloader())
    return timer.end - timer.start if timer.start else float("nan")


def bare_run(dm: UEDataModule, width: int, steps: int, warmup: int) -> float:
    torch.manual_seed(0)
    model = VictimClassifier(arch="resnet18", num_classes=dm.num_classes, in_channels=dm.in_channels,
                             image_size=dm.image_size, width=width).model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=warmup + steps)
    step, start = 0, None
    while step < warmup + steps:
        for x, y, _ in dm.train_dataloader():
            if step == warmup:
                start = time.perf_counter()
            if step == warmup + steps:
                break
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    dm = data(a.batch)
    runs = {"lightning": [], "bare": []}
    for _ in range(a.repeats):  # interleaved, so drifts in machine load hit both alike
        runs["lightning"].append(lightning_run(dm, a.width, a.steps, a.warmup))
        runs["bare"].append(bare_run(dm, a.width, a.steps, a.warmup))
    med = {k: sorted(v)[len(v) // 2] for k, v in runs.items()}
    ips = {k: a.steps * a.batch / t for k, t in med.items()}
    print(f"machine: {machine()}; data: {dm.describe()}")
    print(f"resnet18 width {a.width}, batch {a.batch}, {a.steps} timed steps after {a.warmup}, median of {a.repeats}")
    print("| bare loop (img/s) | Lightning VictimClassifier (img/s) | ratio (goal >= 0.95) |")
    print("|---|---|---|")
    print(f"| {ips['bare']:.1f} | {ips['lightning']:.1f} | {ips['lightning'] / ips['bare']:.3f} |")
    print("raw seconds:", {k: [round(t, 2) for t in v] for k, v in runs.items()})


if __name__ == "__main__":
    main()
