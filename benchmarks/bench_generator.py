"""RobustNoiseGenerator training throughput against the floor implied by its own passes (goal <= 1.2).

    python benchmarks/bench_generator.py [--width 16] [--batch 128] [--steps 2] [--eot 2] [--adv-steps 2]
                                         [--form rem] [--iters 4] [--repeats 5] [--threads N] [--data npz|random]

One training step (``form: rem``, no score model) makes
  * step 1: K_u steps x EOT draws x (K_a inner PGD passes + 1 outer pass),
  * step 2: K_a PGD passes,
each a forward + input gradient (surrogate frozen, BatchNorm in eval), then
  * the update: a train-mode forward + backward into the weights + SGD step,
  * the clean-accuracy forward (no grad) it logs.
``form: plain`` has K_u + K_a passes. The floor is the sum of those unit costs, each
measured alone on the same model and batch; the ratio is the measured Lightning step
(``trainer.fit``, manual optimisation, logging included) over that floor, both medians; the unit
costs are sampled between the training steps (untimed), so both see the same machine load. The ratio does
not depend on K_u, EOT or K_a, so small counts keep the run short; REM's own counts
(10, 5, 10) make 560 passes per step.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from common import SHARED_NPZ, machine, timed
from ue_lightning.ops.attacks import cross_entropy_sum, input_gradient
from ue_lightning.modules.robust import RobustNoiseGenerator


def batch_of(data: str, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``n`` real CIFAR-10 images of the shared npz (shuffled, seeded) or random uint8-grid images."""
    if data == "npz" and SHARED_NPZ.is_file():
        with np.load(SHARED_NPZ) as f:
            pick = np.random.default_rng(0).permutation(len(f["y_train"]))[:n]
            # contiguous (B, C, H, W), as the DataLoader's collate gives the training step: the permuted
            # NHWC array would be channels-last, a faster layout on CPU, and make the floor too low
            x = torch.from_numpy(f["x_train"][pick]).permute(0, 3, 1, 2).contiguous().float() / 255
            y = torch.from_numpy(f["y_train"][pick]).long()
    else:
        g = torch.Generator().manual_seed(0)
        x = torch.randint(0, 256, (n, 3, 32, 32), generator=g).float() / 255
        y = torch.randint(0, 10, (n,), generator=g)
    return x, y, torch.arange(n)


class UnitCosts:
    """Times one inner pass, one update pass and one clean forward on the generator's model and a batch."""

    def __init__(self, gen: RobustNoiseGenerator, x: torch.Tensor, y: torch.Tensor):
        self.gen, self.x, self.y = gen, x, y
        self.delta = torch.zeros_like(x)
        self.twin = copy.deepcopy(gen.model)  # the update is timed on a copy: the run's weights stay untouched
        self.optimizer = torch.optim.SGD(self.twin.parameters(), lr=1e-6, momentum=0.9, weight_decay=5e-4)
        self.samples: dict[str, list[float]] = {"inner": [], "update": [], "forward": []}

    def measure(self) -> None:
        gen, x, y = self.gen, self.x, self.y
        with gen.inner_loop("eval"):
            self.samples["inner"].append(timed(lambda: input_gradient(cross_entropy_sum(gen.model, y), x, self.delta)))
            with torch.no_grad():
                self.samples["forward"].append(timed(lambda: gen.model(x)))
        self.twin.load_state_dict(gen.model.state_dict())
        self.twin.train()

        def update() -> None:
            self.optimizer.zero_grad()
            F.cross_entropy(self.twin(x), y).backward()
            self.optimizer.step()

        self.samples["update"].append(timed(update))

    def median(self, name: str) -> float:
        return statistics.median(self.samples[name])


class StepTimer(L.Callback):
    """Wall time of each training batch; between batches (untimed) ``units`` measures the unit costs."""

    def __init__(self, units: UnitCosts, repeats: int) -> None:
        self.units, self.repeats = units, repeats
        self.times: list[float] = []

    def on_train_batch_start(self, *args) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, *args) -> None:
        self.times.append(time.perf_counter() - self._start)
        for _ in range(self.repeats):
            self.units.measure()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=2, help="K_u")
    p.add_argument("--eot", type=int, default=2)
    p.add_argument("--adv-steps", type=int, default=2, help="K_a")
    p.add_argument("--form", choices=("rem", "plain"), default="rem")
    p.add_argument("--iters", type=int, default=4, help="timed training steps (after one warm-up step)")
    p.add_argument("--repeats", type=int, default=2, help="unit measurements after each training step")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--data", choices=("npz", "random"), default="npz")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    x, y, index = batch_of(a.data, a.batch)
    gen = RobustNoiseGenerator(arch=a.arch, num_classes=10, in_channels=3, image_size=32, width=a.width,
                               steps=a.steps, eot_samples=a.eot, adv_steps=a.adv_steps, form=a.form)
    units = UnitCosts(gen, x, y)
    timer = StepTimer(units, a.repeats)
    loader = DataLoader(TensorDataset(x, y, index), batch_size=a.batch)  # one batch, replayed every epoch
    trainer = L.Trainer(max_steps=1 + a.iters, accelerator="cpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[timer])
    trainer.fit(gen, loader)
    step_time = statistics.median(timer.times[1:])  # the first step warms up
    inner_passes = a.steps * a.eot * (a.adv_steps + 1) + a.adv_steps if a.form == "rem" else a.steps + a.adv_steps
    floor = inner_passes * units.median("inner") + units.median("update") + units.median("forward")
    label = f"{a.form} K_u={a.steps} EOT={a.eot if a.form == 'rem' else '-'} K_a={a.adv_steps}"
    print(f"machine: {machine()}; data: {a.data if a.data == 'random' or SHARED_NPZ.is_file() else 'random'}")
    print(f"steps timed: {[round(t, 3) for t in timer.times[1:]]}")
    print("| generator | model, batch | passes/step | inner pass (s) | update (s) | floor (s) | step (s) "
          "| images/s | ratio (goal <= 1.2) |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| {label} | {a.arch} w{a.width}, {a.batch} | {inner_passes} + update + fwd | {units.median('inner'):.4f} "
          f"| {units.median('update'):.4f} | {floor:.3f} | {step_time:.3f} | {a.batch / step_time:.1f} "
          f"| {step_time / floor:.3f} |")


if __name__ == "__main__":
    main()
