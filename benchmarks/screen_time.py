"""Time one noise screen (fit + test) of the fast victim against the CPU protocol's ResNet-18 victim.

    python benchmarks/screen_time.py                       # resnet18-cpu and airbench-cpu, 1 repeat each
    python benchmarks/screen_time.py --repeats 2 --noise runs/grids/cpu/noise/<hash>/noise.safetensors

A screen is what a CIFAR-10 cell of grids/cpu-table1.yaml does (standard training): ``ue fit``
of the victim config on the 5000-image subset, then ``test`` on the 10000 test images, one torch thread,
in this process, nothing written but a temporary folder. The victims run alternately (ResNet-18 first),
so a change in the machine's load hits both. Prints, per victim, the wall and CPU minutes of every
repeat and the ratio of the medians (goal of the harness: the fast victim at least 5x cheaper). Run it on
an idle machine: CPU time on a loaded one is inflated by the other jobs' use of the caches.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import fit_and_test, machine, victim_args  # noqa: E402

VICTIMS = ("resnet18-cpu", "airbench-cpu")


def screen(victim: str, noise: str | None, root: str) -> dict:
    """One protocol cell's fit + test (seed 0, standard training), in this process."""
    return fit_and_test(victim_args(victim, 0, root) + (["--data.perturbation", noise] if noise else []))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--noise", help="a noise file of the protocol (default: clean data)")
    a = p.parse_args()
    torch.set_num_threads(1)
    print(machine())
    runs: dict[str, list[dict]] = {v: [] for v in VICTIMS}
    with tempfile.TemporaryDirectory() as root:
        for _ in range(a.repeats):
            for victim in VICTIMS:
                result = screen(victim, a.noise, root)
                runs[victim].append(result)
                print(f"{victim}: {result['minutes']:.2f} wall min, {result['cpu_minutes']:.2f} CPU min, "
                      f"train {100 * result['train_acc']:.1f} / test {100 * result['test_acc']:.1f}", flush=True)
    for key in ("minutes", "cpu_minutes"):
        med = {v: statistics.median(r[key] for r in runs[v]) for v in VICTIMS}
        print(f"{key}: resnet18-cpu {med['resnet18-cpu']:.2f}, airbench-cpu {med['airbench-cpu']:.2f}, "
              f"ratio {med['resnet18-cpu'] / med['airbench-cpu']:.2f}")


if __name__ == "__main__":
    main()
