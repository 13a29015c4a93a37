"""Peak memory against dataset size: `ue predict` (the PerturbationWriter) and EM's noise state.

    python benchmarks/bench_memory.py                    # sizes 2000, 8000, 32000 (32x32 RGB)
    python benchmarks/bench_memory.py --sizes 1000,4000
    python benchmarks/bench_memory.py --store            # EM's noise store: memory against file, 1 and 2 ranks

Each measurement is a fresh subprocess (one torch thread) on a synthetic npz of N random
32x32 RGB images (the CIFAR layout), reporting its peak anonymous memory (RssAnon, sampled
every 10 ms: heap and tensors, what cannot be paged back to a file) and its peak resident
set (ru_maxrss, which also counts touched pages of memory-mapped files, reclaimable):

- ``load``: the DataModule set up for predict and its loader iterated, nothing written: the
  cost of the data itself (the npz holds N x 3072 bytes of images; numpy and torch copies);
- ``predict``: ``ue predict`` of ``configs/generator/random.yaml`` on the CPU data (with its overlay) writing
  the noise file (N x 3072 int8 + N coverage bytes, memory-mapped);
- ``em-state``: an ErrorMinimizingNoise (sample-wise, float32 and float16 state, in memory)
  after ``setup("fit")``: the state is N x C x H x W floats per process (per DDP rank).

With ``--store``, each measurement is instead a real sample-wise EM fit of one noise pass
(``train_steps=0``, 1 PGD step, ResNet-18 width 4) over the N images, float32 state, its
``noise_store`` ``memory`` or ``file``, on 1 process or 2 DDP processes (gloo), with the
generator's streaming checkpoint IO or Lightning's own (``lightning``), in three phases,
each reporting every rank's peak anonymous memory during the phase and, at its end, its
file-backed resident memory (RssFile) and its proportional share of it (Pss_File: pages
mapped by both ranks count half in each, so the ranks' sum is what the node holds):

- ``fit``: setup (the store) and the pass, which writes every row;
- ``save``: ``trainer.save_checkpoint`` (rank 0 writes);
- ``load``: in new processes, ``trainer.predict(ckpt_path=...)`` (``ue predict``): setup,
  the restore of the noise from the checkpoint on every rank, and the predict loop (no writer).

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
def status(key, path="/proc/self/status"):  # kB
    with open(path) as f:
        return int([l for l in f if l.startswith(key + ":")][0].split()[1])
def watch():  # peak anonymous memory (heap, tensors), sampled every 10 ms; mapped file pages are not in it
    while True:
        peak_anon[0] = max(peak_anon[0], status("RssAnon"))
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
    main(["predict", "--config", "configs/data/cifar10-npz-cpu.yaml", "--config", "configs/generator/random.yaml",
          "--config", "configs/generator/cifar10-npz-cpu/random.yaml", "--data.root", npz,
          "--data.train_subset", "null", "--trainer.callbacks", json.dumps(writer),
          "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(Path(out).parent)])
elif mode.startswith("em-state"):
    import lightning as L
    from ue_lightning.data import UEDataModule
    from ue_lightning.modules import ErrorMinimizingNoise
    dm = UEDataModule("npz", root=npz, augment=False)
    module = ErrorMinimizingNoise(mode="samplewise", width=4, noise_dtype=mode.split(":")[1], noise_store="memory")
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False)
    trainer.strategy.connect(module)
    module.trainer = trainer
    trainer.datamodule = dm  # what fit() attaches before calling setup
    module.setup("fit")
    assert module.noise is not None
else:  # em-store:<memory|file>:<devices>:<stream|lightning>:<fit|load>
    import lightning as L
    from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
    from ue_lightning.data import UEDataModule
    from ue_lightning.modules import ErrorMinimizingNoise
    _, store, devices, io, part = mode.split(":")
    root = Path(out).parent
    class LightningIO(TorchCheckpointIO):  # Lightning's own IO, under a name the generator leaves alone
        pass
    module = ErrorMinimizingNoise(mode="samplewise", width=4, train_steps=0, max_rounds=1, steps=1,
                                  noise_batch_size=256, noise_store=store, noise_store_dir=str(root))
    t = L.Trainer(accelerator="cpu", devices=int(devices), strategy="ddp" if devices != "1" else "auto",
                  max_epochs=-1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                  enable_model_summary=False, inference_mode=False, default_root_dir=root,
                  plugins=[LightningIO()] if io == "lightning" else None)
    def phase(name, run):
        peak_anon[0] = status("RssAnon")
        run()
        time.sleep(0.05)
        pss = status("Pss_File", "/proc/self/smaps_rollup")
        with open(root / f"phases-{mode}-{t.global_rank}.jsonl", "a") as f:  # two ranks' stdout may interleave
            f.write(json.dumps({"phase": name, "rank": t.global_rank, "anon": peak_anon[0],
                                "file": status("RssFile"), "pss_file": pss}) + "\n")
    dm = UEDataModule("npz", root=npz, augment=False, batch_size=256, eval_batch_size=256)
    ckpt = root / f"em-{store}-{devices}-{io}.ckpt"
    if part == "fit":
        phase("fit", lambda: t.fit(module, datamodule=dm))
        assert module.rounds == 1 and bool(module.covered[dm.train_indices()].all())
        phase("save", lambda: t.save_checkpoint(ckpt))
    else:  # `ue predict --ckpt_path` in a new process (pair)
        phase("load", lambda: t.predict(module, datamodule=dm, ckpt_path=ckpt, return_predictions=False))
    sys.exit(0)
time.sleep(0.05)
print("MAXRSS_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, peak_anon[0])
"""


def fake_npz(path: Path, n: int) -> None:
    rng = np.random.default_rng(0)
    np.savez(path, x_train=rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), y_train=np.arange(n) % 10,
             x_test=rng.integers(0, 256, (100, 32, 32, 3), dtype=np.uint8), y_test=np.arange(100) % 10)


def run_child(mode: str, npz: Path, out: Path) -> list[str]:
    """One measurement in a fresh process (a script file, so that DDP can start its second rank); its stdout lines."""
    script = out.parent / "bench_memory_child.py"
    script.write_text(CHILD)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, str(script), mode, str(npz), str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} failed:\n{proc.stderr[-3000:]}")
    return proc.stdout.splitlines()


def peak_mb(mode: str, npz: Path, out: Path) -> tuple[float, float]:
    """(peak resident set, peak anonymous resident memory) of one measurement, MB."""
    line = [ln for ln in run_child(mode, npz, out) if ln.startswith("MAXRSS_KB")][-1]
    return int(line.split()[1]) / 1024, int(line.split()[2]) / 1024


def store_phases(store: str, devices: int, io: str, npz: Path, out: Path) -> dict[str, list[dict]]:
    """{phase: [per rank {anon, file, pss_file} in MB]} of one EM fit and save, then a restore in new processes."""
    phases: dict[str, list[dict]] = {}
    for part in ("fit", "load"):
        mode = f"em-store:{store}:{devices}:{io}:{part}"
        run_child(mode, npz, out)
        for rank in range(devices):
            for ln in (out.parent / f"phases-{mode}-{rank}.jsonl").read_text().splitlines():
                r = json.loads(ln)
                phases.setdefault(r["phase"], []).append({**{k: r[k] / 1024 for k in ("anon", "file", "pss_file")},
                                                          "rank": r["rank"]})
            (out.parent / f"phases-{mode}-{rank}.jsonl").unlink()
    if sorted(phases) != ["fit", "load", "save"] or any(len(v) != devices for v in phases.values()):
        raise RuntimeError(f"{store}:{devices}:{io} reported {phases}")
    return {k: sorted(v, key=lambda r: r["rank"]) for k, v in phases.items()}


STORES = (("memory", "stream"), ("file", "stream"), ("file", "lightning"))


def store_table(sizes: list[int], tmp: str) -> None:
    rows = []
    for n in sizes:
        npz = Path(tmp) / f"n{n}.npz"
        fake_npz(npz, n)
        for devices in (1, 2):
            for store, io in STORES:
                phases = store_phases(store, devices, io, npz, Path(tmp) / f"n{n}.safetensors")
                rows.append((n, devices, store, io, phases))
                print(json.dumps({"n": n, "devices": devices, "store": store, "io": io, **phases}), flush=True)
    print("\nEM noise state (float32, N x 12 KB): per rank, peak anonymous MB in each phase; file-backed "
          "resident MB (Pss_File: the rank's share) at the end of the pass\n\n"
          "| N images | state (MB) | ranks | store | checkpoint IO | fit | save | load | file-backed after fit |\n"
          "|---|---|---|---|---|---|---|---|---|")
    for n, devices, store, io, p in rows:
        cell = lambda ph: " / ".join(f"{r['anon']:.0f}" for r in p[ph])  # noqa: E731
        filed = " / ".join(f"{r['file']:.0f} ({r['pss_file']:.0f})" for r in p["fit"])
        print(f"| {n} | {n * 3072 * 4 / 2**20:.0f} | {devices} | {store} | {io} | {cell('fit')} | {cell('save')} | "
              f"{cell('load')} | {filed} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="2000,8000,32000")
    p.add_argument("--store", action="store_true", help="EM's noise store, memory against file, 1 and 2 ranks")
    a = p.parse_args()
    sizes = [int(s) for s in a.sizes.split(",")]
    rows = []
    if a.store:
        with tempfile.TemporaryDirectory() as tmp:
            store_table(sizes, tmp)
        return
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
