"""Protection at CPU scale: the small-scale shape of the papers' tables on real CIFAR-10 images.

    python benchmarks/protection_cifar_small.py [--jobs 2] [--only clean,rem,...] [--radii 0,2,4]

Every stage is a plain `ue` command (printed as it starts), run with one torch thread per
process and `--jobs` processes at once. Outputs go to benchmarks/out/cifar-small/ (not
committed); the table goes to results.json and results.md there. Re-running skips stages
whose outputs exist.

The protocol is scaled to 2 CPU cores and is NOT the papers' protocol; say so wherever a
figure is quoted:
- data: ../shared/data/cifar10-jpeg75-subset.npz (real CIFAR-10, JPEG q75 copy), a seeded,
  class-stratified 2000-image train subset (200 per class); the full 10000-image test set;
- victims: ResNet-18 CIFAR form at width 8 (64 in the papers), 20 epochs of batch 128,
  SGD 0.1 cosine; adversarial training with 3 PGD steps of rho_a/2 (REM: 10 of rho_a/4);
- generators: surrogates at width 8, fewer steps than the papers (see GENERATORS below).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "out" / "cifar-small"
NPZ = REPO.parent / "shared" / "data" / "cifar10-jpeg75-subset.npz"
SUBSET = 2000
DATA = ["--data.dataset", "npz", "--data.root", str(NPZ), "--data.train_subset", str(SUBSET), "--data.seed", "0"]
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


def gen_dir(name: str) -> Path:
    return OUT / "generator" / name


def ckpt_overrides(name: str) -> list[str]:
    """Point a generator's checkpoints at our out/ folder (its config has a ModelCheckpoint first)."""
    return ["--trainer.default_root_dir", str(gen_dir(name))]


# name -> (config, extra overrides, needs fit, depends on)
GENERATORS: dict[str, tuple[str, list[str], bool, list[str]]] = {
    "rem": ("configs/generator/rem-cifar10-npz-cpu.yaml",
            ["--model.init_args.width", "8", "--trainer.max_steps", "120", "--model.init_args.lr_decay_steps", "60"],
            True, []),
    "collapse": ("configs/generator/collapse-cifar10-npz-cpu.yaml",
                 ["--model.init_args.width", "8", "--trainer.max_steps", "120",
                  "--model.init_args.lr_decay_steps", "60",
                  "--model.init_args.score_checkpoint", str(OUT / "score" / "last.ckpt")],
                 True, ["score"]),
    "em-samplewise": ("configs/generator/em-samplewise-cifar10-npz-cpu.yaml",
                      ["--model.init_args.width", "8", "--model.init_args.max_rounds", "6"], True, []),
    "em-classwise": ("configs/generator/em-classwise-cifar10-npz-cpu.yaml",
                     ["--model.init_args.width", "8", "--model.init_args.max_rounds", "20"], True, []),
    "tue": ("configs/generator/tue-cifar10-npz-cpu.yaml",
            ["--model.init_args.width", "8", "--trainer.max_epochs", "40", "--data.batch_size", "256"], True, []),
    "tap": ("configs/generator/tap-cifar10-npz-cpu.yaml",
            ["--model.init_args.classifier_checkpoint", str(OUT / "victim" / "clean-rho0" / "last.ckpt")],
            False, ["victim:clean-rho0"]),
    "random": ("configs/generator/random-cifar10-npz-cpu.yaml", [], False, []),
    "lsp": ("configs/generator/lsp-cifar10-npz-cpu.yaml", [], False, []),
}


def run(name: str, args: list[str], log: Path) -> None:
    """Run ``ue ARGS`` with one thread; raise with the log's tail on failure."""
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "ue_lightning.cli", *args]
    print(f"[{time.strftime('%H:%M:%S')}] start {name}: ue {' '.join(args)}", flush=True)
    start = time.time()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT,
                              env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"})
    took = time.time() - start
    print(f"[{time.strftime('%H:%M:%S')}] done  {name} in {took / 60:.1f} min (exit {proc.returncode})", flush=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed; see {log}:\n" + log.read_text()[-3000:])
    with open(OUT / "timings.json", "a") as f:
        f.write(json.dumps({"stage": name, "minutes": round(took / 60, 2)}) + "\n")


def score_stage() -> None:
    if (OUT / "score" / "last.ckpt").exists():
        return
    run("score", ["fit", "--config", "configs/score/cifar10-npz-cpu.yaml", *DATA, *QUIET,
                  "--model.init_args.width", "16", "--trainer.max_epochs", "10",
                  "--trainer.default_root_dir", str(OUT / "score"),
                  "--trainer.callbacks.dirpath", str(OUT / "score")], OUT / "logs" / "score.log")


def generator_stage(name: str) -> None:
    config, extra, needs_fit, _ = GENERATORS[name]
    noise = OUT / "noise" / f"{name}.safetensors"
    if noise.exists():
        return
    ckpt = gen_dir(name) / "last.ckpt"
    callbacks = ["--trainer.callbacks", json.dumps(
        ([{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
           "init_args": {"dirpath": str(gen_dir(name)), "save_last": True, "save_top_k": 0}}] if needs_fit else [])
        + [{"class_path": "ue_lightning.callbacks.PerturbationWriter", "init_args": {"output": str(noise)}}])]
    base = ["--config", config, *DATA, *QUIET, *extra, *ckpt_overrides(name), *callbacks]
    if needs_fit and not ckpt.exists():
        run(f"{name} fit", ["fit", *base], OUT / "logs" / f"{name}-fit.log")
    run(f"{name} predict", ["predict", *base, *(["--ckpt_path", str(ckpt)] if needs_fit else [])],
        OUT / "logs" / f"{name}-predict.log")


def victim_stage(data_name: str, radius: float) -> dict:
    tag = f"{data_name}-rho{radius:g}"
    result_file = OUT / "victim" / tag / "result.json"
    if result_file.exists():
        return json.loads(result_file.read_text())
    noise = [] if data_name == "clean" else ["--data.perturbation", str(OUT / "noise" / f"{data_name}.safetensors")]
    args = ["--config", "configs/data/cifar10-npz-cpu.yaml", "--config", "configs/victim/resnet18-cpu.yaml", *DATA,
            *QUIET, *noise, "--model.init_args.width", "8", "--trainer.max_epochs", "20",
            "--model.init_args.adv_radius", str(radius), "--model.init_args.adv_steps", "3",
            "--model.init_args.adv_step_size", str(radius / 2), "--data.eval_batch_size", "500",
            "--trainer.default_root_dir", str(OUT / "victim" / tag),
            "--trainer.callbacks", json.dumps([{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                                "init_args": {"dirpath": str(OUT / "victim" / tag),
                                                              "save_last": True, "save_top_k": 0}}]),
            "--trainer.check_val_every_n_epoch", "5"]
    if not (OUT / "victim" / tag / "fit.done").exists():  # last.ckpt alone may be mid-training
        run(f"victim {tag} fit", ["fit", *args], OUT / "logs" / f"victim-{tag}-fit.log")
        (OUT / "victim" / tag / "fit.done").touch()
    log = OUT / "logs" / f"victim-{tag}-test.log"
    run(f"victim {tag} test", ["test", *args, "--ckpt_path", str(OUT / "victim" / tag / "last.ckpt")], log)
    acc = float(next(line.split()[1] for line in log.read_text().splitlines() if line.strip().startswith("test/acc")))
    result = {"data": data_name, "rho_a": radius, "test_acc": acc}
    result_file.write_text(json.dumps(result))
    return result


def simclr_stage(data_name: str) -> dict:
    tag = f"simclr-{data_name}"
    result_file = OUT / "victim" / tag / "result.json"
    if result_file.exists():
        return json.loads(result_file.read_text())
    noise = [] if data_name == "clean" else ["--data.perturbation", str(OUT / "noise" / f"{data_name}.safetensors")]
    args = ["--config", "configs/victim/simclr-cifar10-npz-cpu.yaml", *DATA, *QUIET, *noise,
            "--model.init_args.width", "8", "--trainer.max_epochs", "15",
            "--trainer.default_root_dir", str(OUT / "victim" / tag),
            "--trainer.callbacks", json.dumps([{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                                "init_args": {"dirpath": str(OUT / "victim" / tag),
                                                              "save_last": True, "save_top_k": 0}}])]
    if not (OUT / "victim" / tag / "fit.done").exists():
        run(f"{tag} fit", ["fit", *args], OUT / "logs" / f"{tag}-fit.log")
        (OUT / "victim" / tag / "fit.done").touch()
    log = OUT / "logs" / f"{tag}-test.log"
    run(f"{tag} test", ["test", *args, "--ckpt_path", str(OUT / "victim" / tag / "last.ckpt")], log)
    acc = float(next(line.split()[1] for line in log.read_text().splitlines() if line.strip().startswith("test/acc")))
    result = {"data": data_name, "probe_acc": acc}
    result_file.write_text(json.dumps(result))
    return result


ISSUE3 = ("clean", "rem", "collapse")  # the paper's Table 1 shape: every radius


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--only", default=",".join(["clean", *GENERATORS]))
    p.add_argument("--radii", default="0,2,4", help="radii for clean, rem and collapse")
    p.add_argument("--other-radii", default="0,4", help="radii for the other generators")
    p.add_argument("--simclr", default="clean,em-samplewise,tue,collapse")
    a = p.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    names = [n for n in a.only.split(",") if n]
    radii = [float(r) for r in a.radii.split(",") if r]
    other_radii = [float(r) for r in a.other_radii.split(",") if r]
    with ThreadPoolExecutor(a.jobs) as pool:
        # independent first: score model, clean victim (TAP needs it), training-free noise
        first = [pool.submit(score_stage), pool.submit(victim_stage, "clean", 0.0)]
        first += [pool.submit(generator_stage, n) for n in names if n in GENERATORS and not GENERATORS[n][3]]
        for f in first:
            f.result()
        later = [pool.submit(generator_stage, n) for n in names if n in GENERATORS and GENERATORS[n][3]]
        for f in later:
            f.result()
        # in priority order: the seed method's table, then standard training, then AT, then SimCLR
        order = [(n, r) for n in names if n in ISSUE3 for r in radii]
        order += [(n, r) for r in other_radii for n in names if n not in ISSUE3]
        victims = [pool.submit(victim_stage, n, r) for n, r in order]
        probes = [pool.submit(simclr_stage, n) for n in a.simclr.split(",") if n]
        results = [f.result() for f in victims]
        probe_results = [f.result() for f in probes]
    table = {"victims": results, "simclr_probe": probe_results}
    (OUT / "results.json").write_text(json.dumps(table, indent=2))
    all_radii = sorted(set(radii) | set(other_radii))
    lines = ["| train data | " + " | ".join(f"rho_a={r:g}/255" for r in all_radii) + " |",
             "|---|" + "---|" * len(all_radii)]
    for n in names:
        row = {r["rho_a"]: r["test_acc"] for r in results if r["data"] == n}
        lines.append(f"| {n} | " + " | ".join(f"{100 * row[r]:.1f}" if r in row else "-" for r in all_radii) + " |")
    lines += ["", "| train data | SimCLR linear probe, clean test acc |", "|---|---|"]
    lines += [f"| {r['data']} | {100 * r['probe_acc']:.1f} |" for r in probe_results]
    (OUT / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
