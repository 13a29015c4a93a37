"""Peak memory against dataset size: `ue predict` (the PerturbationWriter) and EM's noise state.

    python benchmarks/bench_memory.py                    # sizes 2000, 8000, 32000 (32x32 RGB)
    python benchmarks/bench_memory.py --sizes 1000,4000

Each measurement is a fresh subprocess (one torch thread) on a synthetic npz of N random
32x32 RGB images (the CIFAR layout), reporting its peak anonymous memory (RssAnon, sampled
every 10 ms: heap and tensors, what cannot be paged back to a file) and its peak resident
set (ru_maxrss, which also counts touched pages of memory-mapped files, reclaimable):

- ``load``: the DataModule set up for predict and its loader iterated, nothing written: the
  cost of the data itself (the npz holds N x 3072 bytes of images; numpy and torch copies);
- ``predict``: ``ue predict`` of ``configs/generator/random-cifar10-npz-cpu.yaml`` writing
  the noise file (N x 3072 int8 + N coverage bytes, memory-mapped);
- ``em-state``: an ErrorMinimizingNoise (sample-wise, float32 and float16 state) after
  ``setup("fit")``: the state is N x C x H x W floats per process (per DDP rank).

The writer is O(batch) if the anonymous ``predict - load`` does not grow with N. Results go to stdout as
a Markdown table (copy it to benchmarks/RESULTS.md with the date and machine).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, resource, sys, threading, time
from pathlib import Path
mode, npz, out = sys.argv[1:4]
peak_anon = [0]
def watch():  # peak anonymous memory (heap, tensors), sampled every 10 ms; mapped file pages are not in it
    while True:
        with open("/proc/self/status") as f:
            kb = int([l for l in f if l.startswith("RssAnon:")][0].split()[1])
        peak_anon[0] = max(peak_anon[0], kb)
        time.sleep(0.01)
threading.Thread(target=watch, daemon=True).start()
if mode == "load":
    from ue_lightning.data import UEDataModule
    dm = UEDataModule("npz", root=npz, eval_batch_size=256)
    dm.setup("predict")
    for batch in dm.predict_dataloader():
        pass
elif mode == "predict":
    from ue_lightning.cli import main
    writer = [{"class_path": "ue_lightning.callbacks.PerturbationWriter", "init_args": {"output": out}}]
    main(["predict", "--config", "configs/generator/random-cifar10-npz-cpu.yaml", "--data.root", npz,
          "--data.train_subset", "null", "--trainer.callbacks", json.dumps(writer),
          "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(Path(out).parent)])
else:
    import lightning as L
    from ue_lightning.data import UEDataModule
    from ue_lightning.modules import ErrorMinimizingNoise
    dm = UEDataModule("npz", root=npz, augment=False)
    module = ErrorMinimizingNoise(mode="samplewise", width=4, noise_dtype=mode.split(":")[1])
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False)
    trainer.strategy.connect(module)
    module.trainer = trainer
    trainer.datamodule = dm  # what fit() attaches before calling setup
    module.setup("fit")
    assert module.noise is not None
time.sleep(0.05)
print("MAXRSS_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, peak_anon[0])
"""


def fake_npz(path: Path, n: int) -> None:
    rng = np.random.default_rng(0)
    np.savez(path, x_train=rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), y_train=np.arange(n) % 10,
             x_test=rng.integers(0, 256, (100, 32, 32, 3), dtype=np.uint8), y_test=np.arange(100) % 10)


def peak_mb(mode: str, npz: Path, out: Path) -> tuple[float, float]:
    """(peak resident set, peak anonymous resident memory) of one measurement, MB."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", CHILD, mode, str(npz), str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} failed:\n{proc.stderr[-3000:]}")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("MAXRSS_KB")][-1]
    return int(line.split()[1]) / 1024, int(line.split()[2]) / 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="2000,8000,32000")
    a = p.parse_args()
    sizes = [int(s) for s in a.sizes.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            npz = Path(tmp) / f"n{n}.npz"
            fake_npz(npz, n)
            out = Path(tmp) / f"n{n}.safetensors"
            row = {"n": n, "images_mb": n * 3072 / 2**20}
            for mode in ("load", "predict", "em-state:float32", "em-state:float16"):
                row[mode], row[mode + " anon"] = peak_mb(mode, npz, out)
            row["noise_file_mb"] = out.stat().st_size / 2**20
            rows.append(row)
            print(json.dumps(row), flush=True)
    print("\nPeak anonymous memory (heap and tensors, MB; in brackets the peak resident set, which also counts "
          "the pages of memory-mapped files)\n\n| N images | images (MB) | load | predict | predict - load "
          "| EM state f32 | EM state f16 | noise file (MB) |\n|---|---|---|---|---|---|---|---|")
    for r in rows:
        cell = lambda m: f"{r[m + ' anon']:.0f} ({r[m]:.0f})"  # noqa: E731
        print(f"| {r['n']} | {r['images_mb']:.0f} | {cell('load')} | {cell('predict')} | "
              f"{r['predict anon'] - r['load anon']:.0f} | {cell('em-state:float32')} | {cell('em-state:float16')} | "
              f"{r['noise_file_mb']:.0f} |")


if __name__ == "__main__":
    main()
