"""The CPU protection protocol: does each generator's noise make a victim that learns its data fail?

    python benchmarks/protection_cpu.py                      # everything, 2 processes at once
    python benchmarks/protection_cpu.py --only clean,em-samplewise --seeds 0,1,2 --radii 0
    python benchmarks/protection_cpu.py --table              # print the table of what is done
    python benchmarks/protection_cpu.py --victim airbench-cpu --only clean,em-samplewise --radii "" \
        --noise-dir <a cpu-protocol/noise folder> --verdicts   # the fast victim, side by side

Protocol (CPU scale, NOT the papers' protocol; say so wherever a figure is quoted):

- data: ../shared/data/cifar10-jpeg75-subset.npz (real CIFAR-10, JPEG q75 copy), a seeded,
  class-stratified 5000-image train subset (500 a class); the whole 10000-image test set;
- one noise file per generator, from its configs composed on `configs/data/cifar10-npz-cpu.yaml`
  (`GENERATORS`: each method config with its `configs/generator/cifar10-npz-cpu/` overlay; collapse
  first fits `configs/score/dsm.yaml` with `configs/score/cifar10-npz-cpu/dsm.yaml`);
- victims: `configs/data/cifar10-npz-cpu.yaml` + `configs/victim/resnet18-cpu.yaml`
  (ResNet-18 at width 16, 15 epochs of batch 128, SGD 0.1 cosine, crop + flip), standard
  training with victim seeds 0, 1, 2; PGD adversarial training at rho_a 2/255 and 4/255 with
  3 steps of rho_a/2 (REM evaluates with 10 of rho_a/4: 3.7x the cost) for clean, EM
  sample-wise, REM and collapse (and their rho_a variants), seed 0 (`--at-seeds 0,1` for more);
- every victim reports its train accuracy (last epoch, on the augmented data it trained on)
  and its clean test accuracy.

`--victim airbench-cpu` trains the fast victim (`configs/victim/airbench-cpu.yaml`) instead, in
its own folder benchmarks/out/cpu-protocol-airbench-cpu/ (the ResNet-18 cells stay untouched);
`--noise-dir DIR` reads the noise files from DIR and never generates one; `--verdicts` prints
each noise's verdict (protected: clean test accuracy at least 15 points below the same victim's
on clean data) for the ResNet-18 protocol (`--reference`, default benchmarks/out/cpu-protocol)
and the chosen victim side by side, with the minutes a screen takes.

Every stage is a subprocess with one torch thread (OMP_NUM_THREADS=1), `--jobs` at once.
Outputs go to benchmarks/out/cpu-protocol/ (not committed): a stage whose result file exists
is skipped, so a killed run resumes where it stopped (a generator fit resumes from its
last.ckpt). Timings go to timings.jsonl there.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ue_lightning.compose import compose

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "out" / "cpu-protocol"
NPZ = REPO.parent / "shared" / "data" / "cifar10-jpeg75-subset.npz"
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
DATA = ["--data.root", str(NPZ)]
DATA_CONFIG = str(REPO / "configs" / "data" / "cifar10-npz-cpu.yaml")
#: name -> the configs composed on DATA_CONFIG (each followed by its overlay for that data, ue_lightning.compose);
#: data collapse is REM's loop plus its score step; the variants (rho2, rho0, score1, views) are overlays given last.
GENERATORS = {name: [str(REPO / "configs" / "generator" / f"{m}.yaml") for m in methods] for name, methods in {
    "em-samplewise": ["em-samplewise"], "em-classwise": ["em-classwise"], "rem": ["rem"],
    "collapse": ["rem", "collapse"], "tue": ["tue"], "rem-rho2": ["rem", "cifar10-npz-cpu/rem-rho2"],
    "collapse-rho2": ["rem", "collapse", "cifar10-npz-cpu/collapse-rho2"], "rem-rho0": ["rem", "cifar10-npz-cpu/rem-rho0"],
    "collapse-rho0": ["rem", "collapse", "cifar10-npz-cpu/collapse-rho0"],
    "collapse-rho0-score1": ["rem", "collapse", "cifar10-npz-cpu/collapse-rho0", "cifar10-npz-cpu/collapse-rho0-score1"],
    "tue-views": ["tue", "cifar10-npz-cpu/tue-views"]}.items()}
#: Generators whose configs include the score step (collapse), so a score estimator is fitted first.
NEEDS_SCORE = tuple(name for name, paths in GENERATORS.items() if any(p.endswith("/collapse.yaml") for p in paths))
AT_DATA = ("clean", "em-samplewise", "rem", "collapse", "rem-rho2", "collapse-rho2", "rem-rho0", "collapse-rho0",
           "collapse-rho0-score1")
REFERENCE_VICTIM = "resnet18-cpu"
#: A noise protects if the victim's clean test accuracy is at least this many points below its clean-data one.
PROTECTED_DROP = 15.0


def victim_out(victim: str) -> Path:
    """Folder of a victim's cells: cpu-protocol/ for the protocol's ResNet-18, cpu-protocol-<victim>/ for another."""
    return OUT if victim == REFERENCE_VICTIM else OUT.with_name(f"cpu-protocol-{victim}")


def write_json(path: Path, data: dict) -> None:
    """Atomically: a killed run never leaves a half-written result behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, path)


def run(name: str, args: list[str], log: Path, root: Path = OUT) -> None:
    """Run ``python benchmarks/protection_cpu.py ARGS`` or ``ue ARGS`` with one thread; raise on failure."""
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"[{time.strftime('%H:%M:%S')}] start {name}", flush=True)
    start = time.time()
    with open(log, "w") as f:
        f.write(" ".join(args) + "\n")
        f.flush()
        proc = subprocess.run([sys.executable, *args], cwd=REPO, stdout=f, stderr=subprocess.STDOUT,
                              env={**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
    took = (time.time() - start) / 60
    print(f"[{time.strftime('%H:%M:%S')}] done  {name} in {took:.1f} min (exit {proc.returncode})", flush=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed; see {log}:\n" + log.read_text()[-3000:])
    with open(root / "timings.jsonl", "a") as f:
        f.write(json.dumps({"stage": name, "minutes": round(took, 2), "threads": 1}) + "\n")


def ue(*args: str) -> list[str]:
    return ["-m", "ue_lightning.cli", *args]


def configs(paths: list[str]) -> list[str]:
    """``--config P`` for each path, in merge order."""
    return [arg for path in paths for arg in ("--config", path)]


# ---------------------------------------------------------------------------------- stages
def score_stage() -> Path:
    ckpt = OUT / "score" / "last.ckpt"
    if not ckpt.exists():
        score = compose(DATA_CONFIG, str(REPO / "configs" / "score" / "dsm.yaml"))
        run("score", ue("fit", *configs(score), *DATA, *QUIET, "--trainer.default_root_dir", str(OUT / "score"),
                        "--trainer.callbacks.dirpath", str(OUT / "score")), OUT / "logs" / "score.log")
    return ckpt


def generator_stage(name: str) -> Path:
    """Fit (resuming from last.ckpt) and predict one generator's noise file."""
    noise = OUT / "noise" / f"{name}.safetensors"
    if noise.exists():
        return noise
    folder = OUT / "generator" / name
    callbacks = json.dumps([
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"dirpath": str(folder), "save_last": True, "save_top_k": 0, "enable_version_counter": False,
                       "every_n_train_steps": 10}},
        {"class_path": "ue_lightning.callbacks.PerturbationWriter", "init_args": {"output": str(noise)}}])
    extra = ["--model.init_args.score_checkpoint", str(score_stage())] if name in NEEDS_SCORE else []
    base = [*configs(compose(DATA_CONFIG, *GENERATORS[name])), *DATA, *QUIET, *extra,
            "--trainer.default_root_dir", str(folder), "--trainer.callbacks", callbacks]
    ckpt = folder / "last.ckpt"
    if not (folder / "fit.done").exists():
        resume = ["--ckpt_path", str(ckpt)] if ckpt.exists() else []
        run(f"{name} fit", ue("fit", *base, *resume), OUT / "logs" / f"{name}-fit.log")
        (folder / "fit.done").touch()
    run(f"{name} predict", ue("predict", *base, "--ckpt_path", str(ckpt)), OUT / "logs" / f"{name}-predict.log")
    return noise


def victim_tag(data: str, radius: float, seed: int, defence: str = "none") -> str:
    return f"{data}-rho{radius:g}-seed{seed}" + ("" if defence == "none" else f"-{defence}")


def noise_file(name: str, noise_dir: Path | None) -> Path:
    """A generator's noise file: read from ``noise_dir`` (never generated there), else made by :func:`generator_stage`."""
    if noise_dir is None:
        return generator_stage(name)
    path = noise_dir / f"{name}.safetensors"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no noise file for {name} (--noise-dir files are read, never generated)")
    return path


def victim_stage(data: str, radius: float, seed: int, defence: str = "none", victim: str = REFERENCE_VICTIM,
                 noise_dir: Path | None = None) -> dict:
    tag = victim_tag(data, radius, seed, defence)
    root = victim_out(victim)
    result = root / "victim" / tag / "result.json"
    if result.exists():
        return json.loads(result.read_text())
    noise = None if data == "clean" else str(noise_file(data, noise_dir))
    run(f"{victim} {tag}", [__file__, "--cell", data, str(radius), str(seed), "--defence", defence,
                            "--victim", victim, *(["--noise", noise] if noise else [])],
        root / "logs" / f"victim-{tag}.log", root)
    return json.loads(result.read_text())


def fit_and_test(args: list[str]) -> dict:
    """Fit and test one victim through the package's CLI (``ue fit`` ARGS, then test): accuracies, wall and CPU minutes."""
    from ue_lightning.cli import build_cli

    cli = build_cli(args, run=False)
    start, cpu = time.time(), time.process_time()
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    train_acc = float(cli.trainer.callback_metrics["train/acc"])
    test_acc = float(cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)[0]["test/acc"])
    return {"train_acc": train_acc, "test_acc": test_acc, "minutes": round((time.time() - start) / 60, 2),
            "cpu_minutes": round((time.process_time() - cpu) / 60, 2)}  # the process's CPU time: less load-bound


def victim_args(victim: str, seed: int, root: str | Path, radius: float = 0.0) -> list[str]:
    """``ue fit`` options of one protocol victim (no checkpoints; PGD AT with 3 steps of rho_a / 2 if radius > 0)."""
    return ["--config", str(REPO / "configs/data/cifar10-npz-cpu.yaml"), "--config",
            str(REPO / f"configs/victim/{victim}.yaml"), *DATA, *QUIET, "--seed_everything", str(seed),
            "--data.eval_batch_size", "500", "--trainer.default_root_dir", str(root), "--trainer.callbacks", "[]",
            "--trainer.enable_checkpointing", "false", "--trainer.check_val_every_n_epoch", "100",
            "--model.init_args.adv_radius", str(radius), "--model.init_args.adv_steps", "3",
            "--model.init_args.adv_step_size", str(radius / 2)]


def victim_cell(data: str, radius: float, seed: int, noise: str | None, defence: str = "none",
                victim: str = REFERENCE_VICTIM) -> None:
    """In a subprocess: fit and test one victim through the package's CLI, write its result.json."""
    tag = victim_tag(data, radius, seed, defence)
    folder = victim_out(victim) / "victim" / tag
    args = victim_args(victim, seed, folder, radius)
    if noise:
        args += ["--data.perturbation", noise]
    if defence != "none":
        args += ["--data.defence", defence]
    write_json(folder / "result.json", {"data": data, "rho_a": radius, "seed": seed, "defence": defence,
                                        "victim": victim, **fit_and_test(args), "threads": 1})


# ---------------------------------------------------------------------------------- the table
def collect(root: Path = OUT) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((root / "victim").glob("*/result.json"))]


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{100 * values[0]:.1f} (1 seed)"
    return f"{100 * statistics.mean(values):.1f} ± {100 * statistics.stdev(values):.1f} ({len(values)} seeds)"


def table(results: list[dict]) -> str:
    names = ["clean", *GENERATORS]
    radii = sorted({r["rho_a"] for r in results})
    lines = ["| train data | " + " | ".join(f"rho_a={r:g}: train / test" for r in radii) + " |",
             "|---|" + "---|" * len(radii)]
    defences = ["none", *sorted({r.get("defence", "none") for r in results} - {"none"})]
    for defence in defences:
        for name in names:
            cells = []
            for radius in radii:
                rows = [r for r in results
                        if r["data"] == name and r["rho_a"] == radius and r.get("defence", "none") == defence]
                cells.append(f"{mean_std([r['train_acc'] for r in rows])} / {mean_std([r['test_acc'] for r in rows])}"
                             if rows else "-")
            if any(c != "-" for c in cells):
                label = name if defence == "none" else f"{name} + {defence}"
                lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def standard(results: list[dict], name: str) -> list[float]:
    """Clean test accuracies of the standard-training, undefended cells of one train data."""
    return [r["test_acc"] for r in results if r["data"] == name and r["rho_a"] == 0 and r.get("defence", "none") == "none"]


def verdict(results: list[dict], name: str) -> tuple[str, bool | None]:
    """Mean test accuracy (%) with its verdict against the same victim's clean cells, and the verdict."""
    accs, clean = standard(results, name), standard(results, "clean")
    if not accs:
        return "- | -", None
    if name == "clean" or not clean:
        return f"{mean_std(accs)} | {'(clean data)' if name == 'clean' else 'no clean cell'}", None
    drop = 100 * (statistics.mean(clean) - statistics.mean(accs))
    protected = drop >= PROTECTED_DROP
    return f"{mean_std(accs)} | {'**protected**' if protected else 'not protected'} ({drop:.1f} below clean)", protected


def verdicts(reference: list[dict], results: list[dict], victim: str) -> str:
    """The reference (ResNet-18) protocol's verdict on every train data next to ``victim``'s, and their minutes."""
    lines = [f"| train data | {REFERENCE_VICTIM}: test % | verdict | {victim}: test % | verdict | same verdict |",
             "|---|---|---|---|---|---|"]
    names = ["clean", *GENERATORS]
    names += sorted({r["data"] for r in reference + results} - set(names))
    for name in names:
        (ref_text, ref), (text, mine) = verdict(reference, name), verdict(results, name)
        if ref_text == text == "- | -":
            continue
        same = "-" if ref is None or mine is None else ("yes" if ref == mine else "**no**")
        lines.append(f"| {name} | {ref_text} | {text} | {same} |")
    for key, what in (("minutes", "wall"), ("cpu_minutes", "CPU")):
        minutes = [[r[key] for r in rows if r["rho_a"] == 0 and r.get("defence", "none") == "none" and key in r]
                   for rows in (reference, results)]
        if all(minutes):
            ref_min, min_ = (statistics.mean(m) for m in minutes)
            lines.append(f"| {what} minutes a screen (fit + test, mean of {len(minutes[0])} and {len(minutes[1])} "
                         f"cells) | {ref_min:.2f} | | {min_:.2f} | | {ref_min / min_:.1f}x less |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--only", default=",".join(["clean", *GENERATORS]))
    p.add_argument("--seeds", default="0,1,2", help="victim seeds of standard training")
    p.add_argument("--radii", default="2,4", help="adversarial-training radii (1/255), for " + ",".join(AT_DATA))
    p.add_argument("--at-seeds", default="0", help="victim seeds of the adversarial-training cells, comma-separated")
    p.add_argument("--defences", default="", help="extra standard-training cells DATA:DEFENCE,... with "
                   "data.defence (e.g. em-samplewise:jpeg10,clean:jpeg10), each with the --seeds")
    p.add_argument("--table", action="store_true", help="only print the table of the finished victims")
    p.add_argument("--victim", default=REFERENCE_VICTIM, help="victim config of configs/victim/ (airbench-cpu: the "
                   "fast victim, its cells in benchmarks/out/cpu-protocol-airbench-cpu/)")
    p.add_argument("--noise-dir", type=Path, help="read the noise files <name>.safetensors from this folder, "
                   "never generate them (default: benchmarks/out/cpu-protocol/noise, generated if missing)")
    p.add_argument("--verdicts", action="store_true", help="also print each noise's verdict for the ResNet-18 "
                   "protocol and --victim side by side (protected: test accuracy >= 15 points below clean)")
    p.add_argument("--reference", type=Path, action="append", help="the ResNet-18 protocol's folder for --verdicts "
                   "(default benchmarks/out/cpu-protocol; repeat to pool the cells of several)")
    p.add_argument("--cell", nargs=3, metavar=("DATA", "RADIUS", "SEED"), help=argparse.SUPPRESS)
    p.add_argument("--noise", help=argparse.SUPPRESS)
    p.add_argument("--defence", default="none", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.cell:
        victim_cell(a.cell[0], float(a.cell[1]), int(a.cell[2]), a.noise, a.defence, a.victim)
        return
    root = victim_out(a.victim)
    if not a.table:
        root.mkdir(parents=True, exist_ok=True)
        names = [n for n in a.only.split(",") if n]
        seeds = [int(s) for s in a.seeds.split(",") if s]
        radii = [float(r) for r in a.radii.split(",") if r]
        cells = [(n, 0.0, s) for s in seeds for n in names]
        at_seeds = [int(s) for s in a.at_seeds.split(",") if s]
        cells += [(n, r, s) for s in at_seeds for r in radii for n in names if n in AT_DATA]
        defended = [tuple(pair.split(":")) for pair in a.defences.split(",") if pair]
        cells += [(n, 0.0, s, d) for s in seeds for n, d in defended]
        names += [n for n, _ in defended if n not in names]
        with ThreadPoolExecutor(a.jobs) as pool:
            # generators first (two at once), then the victims in order: seed 0 of every noise first
            for future in [pool.submit(noise_file, n, a.noise_dir) for n in names if n != "clean"]:
                future.result()
            for future in [pool.submit(victim_stage, *cell, victim=a.victim, noise_dir=a.noise_dir) for cell in cells]:
                future.result()
    text = (f"CPU protocol (5000 CIFAR-10 JPEG images, victim configs/victim/{a.victim}.yaml; one thread a process): "
            "victims' train accuracy (last epoch) / clean test accuracy, %\n" + table(collect(root)))
    if a.verdicts:
        reference = [r for folder in a.reference or [OUT] for r in collect(folder)]
        text += "\n\nVerdicts, standard training:\n" + verdicts(reference, collect(root), a.victim)
    print(text)
    write_json(root / "results.json", {"victims": collect(root)})
    (root / "results.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
