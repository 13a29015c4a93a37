"""One PGD step against one forward + input-gradient pass (goal: at most 1.1 times it).

    python benchmarks/bench_pgd.py [--width 16] [--batch 128] [--steps 10] [--repeats 5]

A PGD step is one forward, one input gradient (torch.autograd.grad on delta), a sign
step and a projection; parameters' gradients are never computed. The floor is
`ue_lightning.ops.attacks.input_gradient` alone on the same model and batch.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from common import best_of, machine, timed
from ue_lightning.ops.attacks import input_gradient, pgd_minimize
from ue_lightning.models import build_classifier


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args()
    torch.manual_seed(0)
    model = build_classifier(a.arch, 10, image_size=32, width=a.width).eval()
    x, y = torch.rand(a.batch, 3, 32, 32), torch.randint(0, 10, (a.batch,))
    loss_fn = lambda z: F.cross_entropy(model(z), y, reduction="sum")  # noqa: E731
    delta = torch.zeros_like(x)

    def floor() -> float:  # steps x (forward + input gradient)
        return timed(lambda: [input_gradient(loss_fn, x, delta) for _ in range(a.steps)]) / a.steps

    def pgd() -> float:
        return timed(lambda: pgd_minimize(loss_fn, x, radius=8 / 255, step_size=0.8 / 255, steps=a.steps)) / a.steps

    floor(), pgd()  # warm-up
    f_med, f_all = best_of(floor, a.repeats)
    p_med, p_all = best_of(pgd, a.repeats)
    print(f"machine: {machine()}")
    print(f"{a.arch} width {a.width}, batch {a.batch}, {a.steps} steps, median of {a.repeats}")
    print("| forward + input grad (s) | PGD step (s) | ratio (goal <= 1.1) |")
    print("|---|---|---|")
    print(f"| {f_med:.4f} | {p_med:.4f} | {p_med / f_med:.3f} |")


if __name__ == "__main__":
    main()
