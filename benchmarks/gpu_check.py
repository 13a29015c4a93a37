"""GPU check (issue 25): every generator, the score estimator and an adversarially trained victim, a few steps on
CUDA, each step's loss compared with the same step on the CPU. Meant to take under 8 minutes on one GPU (not yet
run on one: this project's machines have none); the CPU dry run takes about 35 s on one busy thread.

    python benchmarks/gpu_check.py                 # the first visible CUDA device against the CPU
    python benchmarks/gpu_check.py --device cpu    # dry run: the very same checks, CPU against CPU

Without a CUDA device (and without ``--device cpu``) it exits at once, non-zero, with a one-line message.

Stages, in order: the score estimator, EM sample-wise, EM class-wise, TUE, REM, data collapse (on this device's
score estimator), and the pipeline's victim under PGD adversarial training (radius 16/255, 3 steps of 4/255) on
the CPU run's EM sample-wise noise file (so that only the victim's own steps differ). Each is built as
``ue pipeline`` builds it: its configs composed with the embedded digits (``configs/data/digits.yaml``, no
download) by ``ue_lightning.compose``, run through the package's LightningCLI (``ue_lightning.lightning_cli.stage_cli``:
``Trainer(accelerator=..., devices=1, max_steps=few)``), in the precision the configs set (none sets one: 32-true;
``--precision bf16-mixed`` runs the checked device in mixed precision against the 32-true CPU run) and in the
memory layout the models choose (channels-last unless ``channels_last_is_safe`` refuses it: the greyscale digits'
models are NCHW; the table says which). The check overrides: 64 train digits (``data.train_subset``, seed 0) in
one batch of 64, the fixed batch of every step; a few steps (``trainer.max_steps``); a noise pass every 2 steps
for EM class-wise and TUE (``train_steps``); TUE's idle SimCLR surrogate trained (``skip_idle_surrogate false``) so
that its encoder runs; no validation. Widths are the digits configs' own (8 for every ResNet-18, 16 for the score
network).

Per stage and device it checks that the module and its batches were on the device and, for each generator, its
noise file (``PerturbationWriter`` after the fit, over the 64 digits): read back with ``NoiseFile.open``, made for
this data (``check_matches``), its shape (1347 rows, or 10 class rows, of 1x16x16), the 64 digits covered, and
``0 < |delta| <= epsilon`` (64/255 for every digits generator). Then it compares each logged loss of each step
(``train/dsm_loss``, ``em/surrogate_loss``, ``train/ssl_loss`` and ``noise/csd``, ``train/loss``), as the relative
difference ``|a - b| / max(|a|, |b|)``:

* the first step (the same initial weights, the same fixed batch, the same random draws on both devices) within
  ``--rtol-first`` (default 1e-3) for the stages whose first loss has no sign step before it (score, EM, TUE);
* every step within ``--rtol`` (default 0.05). Sign steps (PGD) turn rounding into whole steps of noise, and a
  step of a fresh BatchNorm network turns small gradient differences into larger weight differences, so two
  correct float32 runs drift apart over a few steps: rounding the convolutions' inputs and weights to 10 (TF32,
  cuDNN's default on Ampere and later) to 20 mantissa bits, emulated on the CPU, moved these steps' losses by
  up to 2.3%, and the first steps of score, EM and TUE by at most 6e-5 (REM's and collapse's first
  step, 10 sign steps in, by up to 2%; the victim's, 3 attack steps in, by 1.4e-3). Drawing the checked run's
  random numbers from another stream moved score's, EM's and TUE's first steps by 4e-3 to 0.26.

With ``--precision`` set to a mixed precision the defaults are 1e-2 and 0.1 (bf16-mixed on the CPU against
32-true: up to 1.2e-3 and 2.2%). CPU against CPU is exact. Random draws are made by the CPU generator and moved
to the device (``HostRandom``): both devices then draw the same numbers from the same seed (CUDA's generator
would draw others, and no loss could be compared). Prints a table; exits 1 if any stage fails.

Units: pixels in [0, 1]; budgets (epsilon, adversarial radius, step sizes) in 1/255 units.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import torch
from lightning.pytorch.callbacks import Callback
from torch.overrides import TorchFunctionMode

from ue_lightning.callbacks import PerturbationWriter
from ue_lightning.compose import compose
from ue_lightning.data.noise_file import NoiseFile
from ue_lightning.models import ImageClassifier
from ue_lightning.console import lightning_info_off
from ue_lightning.lightning_cli import stage_cli
from ue_lightning.pipeline import GENERATORS, config_list

REPO = Path(__file__).resolve().parents[1]
DATA = "configs/data/digits.yaml"
SUBSET = 64  # train digits of every stage: one batch, the fixed batch of every step
ADV_RADIUS, ADV_STEPS = 16, 3  # the victim's PGD adversarial training, 1/255 units
RTOL, RTOL_FIRST = 0.05, 1e-3  # every step, and the first step of a stage without a sign step before its loss
RTOL_MIXED, RTOL_FIRST_MIXED = 0.1, 1e-2  # the same with --precision *-mixed
NO_CUDA = "gpu_check: no CUDA device; run on a machine with a GPU, or --device cpu for a dry run"


@dataclass(frozen=True)
class Stage:
    """One stage: its configs (composed with the digits), steps, the losses it logs, and what it needs.

    ``inputs`` maps a command-line flag to the stage whose output (score checkpoint, noise file) it takes.
    """

    name: str
    configs: tuple[str, ...]
    steps: int
    losses: tuple[str, ...]
    overrides: tuple[str, ...] = ()
    inputs: tuple[tuple[str, str], ...] = ()
    kind: Literal["generator", "score", "victim"] = "generator"  # a generator writes a noise file, score a checkpoint
    reference_inputs: bool = False  # both devices take the reference (CPU) run's outputs
    signed_first: bool = False  # the first step's loss comes after sign (PGD) steps: only ``rtol`` holds

    def needs(self) -> list[str]:
        return [stage for _, stage in self.inputs]


def stages() -> list[Stage]:
    """The check's stages, each after the stages it needs."""

    def generator(name: str) -> tuple[str, ...]:
        return tuple(compose(DATA, *config_list(GENERATORS[name])))

    surrogate = ("em/surrogate_loss",)
    return [
        Stage("score", tuple(compose(DATA, "configs/score/dsm.yaml")), 3, ("train/dsm_loss",), kind="score"),
        Stage("em-samplewise", generator("em-samplewise"), 3, surrogate),
        Stage("em-classwise", generator("em-classwise"), 4, surrogate, ("--model.init_args.train_steps", "2")),
        Stage("tue", generator("tue"), 4, ("train/ssl_loss", "noise/csd"),
              ("--model.init_args.train_steps", "2", "--model.init_args.skip_idle_surrogate", "false")),
        Stage("rem", generator("rem"), 2, ("train/loss",), signed_first=True),
        Stage("collapse", generator("collapse"), 2, ("train/loss",),
              inputs=(("--model.init_args.score_checkpoint", "score"),), signed_first=True),
        Stage("victim-at", ("configs/victim/digits.yaml",), 3, ("train/loss",),
              ("--model.init_args.adv_radius", str(ADV_RADIUS), "--model.init_args.adv_steps", str(ADV_STEPS)),
              inputs=(("--data.perturbation", "em-samplewise"),), kind="victim", reference_inputs=True,
              signed_first=True),
    ]


class HostRandom(TorchFunctionMode):
    """Random draws by the CPU generator, moved to the device they were asked on.

    A CUDA run and a CPU run of the same seed then draw the same numbers (the score estimator's noise, the
    victim's PGD start, the SimCLR views); the CUDA generator would draw others. Draws given a generator pass.
    """

    FACTORIES = (torch.rand, torch.randn, torch.randint, torch.randperm)
    LIKE = (torch.rand_like, torch.randn_like, torch.randint_like)

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = dict(kwargs or {})
        if kwargs.get("generator") is not None or (func not in self.FACTORIES and func not in self.LIKE):
            return func(*args, **kwargs)
        if func in self.LIKE:
            target = torch.device(kwargs.pop("device", None) or args[0].device)
            args = (torch.empty_like(args[0], device="cpu"), *args[1:])
        else:
            target = torch.device(kwargs.get("device") or "cpu")
            kwargs["device"] = "cpu"
        return func(*args, **kwargs).to(target)


@dataclass
class Run:
    """One stage on one device: its losses by (name, step), what it wrote, and what went wrong."""

    losses: dict[tuple[str, int], float] = field(default_factory=dict)
    output: Path | None = None
    layout: str = "-"  # channels-last or NCHW, as the module's classifiers chose
    noise: str = "-"
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)


class DeviceProbe(Callback):
    """Notes the device types of the module and of each train batch."""

    def __init__(self) -> None:
        self.devices: set[str] = set()

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.devices |= {pl_module.device.type, batch[0].device.type}


def trainer_overrides(device: torch.device, steps: int, precision: str | None) -> list[str]:
    """The options every stage takes: the device, a few steps on the fixed batch, every step logged."""
    out = ["--trainer.accelerator", device.type, "--trainer.devices", "1", "--trainer.max_steps", str(steps),
           "--trainer.log_every_n_steps", "1", "--trainer.limit_val_batches", "0",
           "--trainer.num_sanity_val_steps", "0", "--data.train_subset", str(SUBSET), "--data.batch_size", str(SUBSET),
           "--data.num_workers", "0"]
    return out + (["--trainer.precision", precision] if precision else [])


def logged_losses(metrics_csv: Path, names: tuple[str, ...]) -> dict[tuple[str, int], float]:
    """The values of ``names`` in a CSVLogger's ``metrics.csv``, by (name, step)."""
    with open(metrics_csv) as f:
        rows = list(csv.DictReader(f))
    return {(name, int(row["step"])): float(row[name]) for row in rows for name in names if row.get(name)}


def layout_of(module: torch.nn.Module) -> str:
    """``channels-last``/``NCHW`` as the module's classifiers chose (``ImageClassifier.channels_last``)."""
    flags = {m.channels_last for m in module.modules() if isinstance(m, ImageClassifier)}
    return "-" if not flags else "/".join(sorted("channels-last" if f else "NCHW" for f in flags))


def check_noise_file(path: Path, datamodule: Any, classwise: bool) -> tuple[str, list[str]]:
    """Read a noise file back: made for this data, its shape, the subset covered, ``|delta| <= epsilon``."""
    noise = NoiseFile.open(path)
    clean = datamodule.clean_split("train")
    noise.check_matches(clean.fingerprint())
    rows = clean.num_classes if classwise else len(clean)
    largest, bound = noise.max_abs(), math.floor(noise.metadata.epsilon + 1e-6)
    problems = []
    if tuple(noise.delta.shape) != (rows, *clean.image_shape) or noise.classwise != classwise:
        problems.append(f"noise shape {tuple(noise.delta.shape)}, expected {(rows, *clean.image_shape)}")
    if not classwise and int(noise.covered.sum()) != SUBSET:
        problems.append(f"noise covers {int(noise.covered.sum())} digits, expected {SUBSET}")
    if largest > bound or largest == 0:
        problems.append(f"max |delta| {largest}/255 (epsilon {bound}/255)")
    return f"{tuple(noise.delta.shape)} max {largest}/{bound}", problems


def run_stage(stage: Stage, device: torch.device, root: Path, sources: dict[str, Run], precision: str | None) -> Run:
    """Fit ``stage`` a few steps on ``device`` under HostRandom, then write its noise file or checkpoint below
    ``root``; its inputs are the outputs of the runs in ``sources``."""
    inputs = [a for flag, name in stage.inputs for a in (flag, str(sources[name].output))]
    overrides = [*trainer_overrides(device, stage.steps, precision), *stage.overrides, *inputs]
    cli = stage_cli([str(REPO / c) for c in stage.configs], root, *overrides, progress=False)
    probe = DeviceProbe()
    cli.trainer.callbacks.append(probe)
    run, start = Run(), time.perf_counter()
    with HostRandom():
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        if stage.kind == "generator":
            run.output = root / f"{stage.name}.safetensors"
            cli.trainer.callbacks.append(PerturbationWriter(str(run.output)))
            cli.trainer.predict(cli.model, datamodule=cli.datamodule, return_predictions=False)
    if stage.kind == "score":
        run.output = root / "score.ckpt"
        cli.trainer.save_checkpoint(run.output, weights_only=True)
    run.seconds = time.perf_counter() - start
    run.layout = layout_of(cli.model)
    run.losses = logged_losses(Path(cli.trainer.logger.log_dir) / "metrics.csv", stage.losses)
    if probe.devices != {device.type}:
        run.problems.append(f"ran on {sorted(probe.devices)}, not {device.type}")
    if stage.kind == "generator":
        run.noise, problems = check_noise_file(run.output, cli.datamodule, bool(getattr(cli.model, "classwise", False)))
        run.problems += problems
    return run


@dataclass(frozen=True)
class Tolerance:
    """Largest relative loss differences: of every step, and of the first step of a stage without sign steps."""

    every: float
    first: float


def relative_differences(checked: dict[tuple[str, int], float],
                         reference: dict[tuple[str, int], float]) -> dict[tuple[str, int], float]:
    """``|a - b| / max(|a|, |b|)`` for each (loss, step) both runs logged (inf where one is not finite)."""
    out = {}
    for key in sorted(set(checked) & set(reference)):
        a, b = checked[key], reference[key]
        finite = math.isfinite(a) and math.isfinite(b)
        out[key] = abs(a - b) / max(abs(a), abs(b), 1e-12) if finite else math.inf
    return out


def compare(stage: Stage, checked: dict[tuple[str, int], float], reference: dict[tuple[str, int], float],
            tolerance: Tolerance) -> tuple[float, float, list[str]]:
    """The first step's and the largest relative difference of a stage's losses, and what is wrong."""
    problems = []
    if set(checked) != set(reference):
        problems.append(f"logged other steps: {sorted(set(checked) ^ set(reference))}")
    missing = [name for name in stage.losses if not any(key[0] == name for key in reference)]
    if missing:
        problems.append(f"no {', '.join(missing)} logged")
    diffs = relative_differences(checked, reference)
    first_step = min((step for _, step in diffs), default=None)
    first = max((d for (_, step), d in diffs.items() if step == first_step), default=math.inf)
    worst = max(diffs.values(), default=math.inf)
    first_bound = tolerance.every if stage.signed_first else tolerance.first
    if first > first_bound:
        problems.append(f"first step differs by {first:.2g} > {first_bound:g}")
    if worst > tolerance.every:
        problems.append(f"losses differ by up to {worst:.2g} > {tolerance.every:g}")
    return first, worst, problems


def check(device: torch.device, workdir: Path, tolerance: Tolerance, precision: str | None) -> list[dict[str, str]]:
    """Every stage on ``device`` and on the CPU; one table row per stage (its error is empty when it passed)."""
    runs: dict[str, dict[str, Run]] = {"checked": {}, "reference": {}}
    rows = []
    for stage in stages():
        print(f"== {stage.name}: {stage.steps} steps on {device.type} and on cpu", flush=True)
        row = {"stage": stage.name, "steps": str(stage.steps), "error": ""}
        for side, dev, prec in (("checked", device, precision), ("reference", torch.device("cpu"), None)):
            inputs = runs["reference" if stage.reference_inputs else side]
            if any(name not in inputs for name in stage.needs()):
                row["error"] = f"needs {', '.join(stage.needs())}, which failed"
                break
            try:
                with lightning_info_off(), warnings.catch_warnings():
                    # the CPU reference run on a GPU machine leaves the GPU unused on purpose
                    warnings.filterwarnings("ignore", message="GPU available but not used")
                    runs[side][stage.name] = run_stage(stage, dev, workdir / side / stage.name, inputs, prec)
            except Exception as e:  # noqa: BLE001 - a stage's failure is a row of the table, not the end of it
                traceback.print_exc()  # the whole of it here, its first line in the table
                first_line = (str(e).splitlines() or [""])[0]
                row["error"] = f"{'cpu' if side == 'reference' else device.type} run: {type(e).__name__}: {first_line}"
                break
        rows.append(row if row["error"] else row | verdict(stage, runs, tolerance))
    return rows


def verdict(stage: Stage, runs: dict[str, dict[str, Run]], tolerance: Tolerance) -> dict[str, str]:
    """The table row of a stage that ran on both devices."""
    checked, reference = runs["checked"][stage.name], runs["reference"][stage.name]
    first, worst, problems = compare(stage, checked.losses, reference.losses, tolerance)
    problems = [*checked.problems, *(f"cpu: {p}" for p in reference.problems), *problems]
    last = max(reference.losses, default=None, key=lambda key: (key[1], key[0]))
    loss = "-" if last is None else f"{last[0]} {checked.losses.get(last, math.nan):.4g} / {reference.losses[last]:.4g}"
    return {"loss": loss, "first": f"{first:.1e}" + ("" if stage.signed_first else " *"), "worst": f"{worst:.1e}",
            "layout": checked.layout, "noise": checked.noise,
            "seconds": f"{checked.seconds:.1f} / {reference.seconds:.1f}", "error": "; ".join(problems)}


def format_table(rows: list[dict[str, str]], device: torch.device) -> str:
    """Markdown table, one row per stage, columns padded to a common width."""
    header = ["stage", "steps", f"last loss ({device.type} / cpu)", "first step rel diff", "max rel diff",
              "layout", "noise file", f"seconds ({device.type} / cpu)", "result"]
    keys = ["stage", "steps", "loss", "first", "worst", "layout", "noise", "seconds"]
    table = [header] + [[row.get(k, "-") for k in keys] + [row["error"] or "ok"] for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    lines = ["| " + " | ".join(cell.ljust(w) for cell, w in zip(line, widths)) + " |" for line in table]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                   help="cuda: the first visible GPU (choose it with CUDA_VISIBLE_DEVICES); cpu: a dry run")
    p.add_argument("--precision", help="trainer.precision of the checked device's runs (e.g. bf16-mixed); default: "
                                       "the configs' (32-true)")
    p.add_argument("--rtol", type=float, help=f"largest relative loss difference of any step (default {RTOL}, "
                                              f"{RTOL_MIXED} with a mixed --precision)")
    p.add_argument("--rtol-first", type=float, help=f"... of the first step of score, EM and TUE (default "
                                                    f"{RTOL_FIRST}, {RTOL_FIRST_MIXED} with a mixed --precision)")
    p.add_argument("--workdir", help="keep the runs' logs, checkpoints and noise files here (default: a temporary "
                                     "folder, removed)")
    return p.parse_args(argv)


def tolerance_of(a: argparse.Namespace) -> Tolerance:
    mixed = bool(a.precision) and "mixed" in a.precision
    every, first = (RTOL_MIXED, RTOL_FIRST_MIXED) if mixed else (RTOL, RTOL_FIRST)
    return Tolerance(every if a.rtol is None else a.rtol, first if a.rtol_first is None else a.rtol_first)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    device = torch.device(a.device)
    with warnings.catch_warnings():  # a driver without a device warns here: the message below says it in one line
        warnings.simplefilter("ignore")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise SystemExit(NO_CUDA)
    tolerance, start = tolerance_of(a), time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        rows = check(device, Path(a.workdir or tmp), tolerance, a.precision)
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu (dry run: cpu against cpu)"
    print(f"\ngpu_check on {name}, torch {torch.__version__}, precision {a.precision or 'of the configs'}, "
          f"rtol {tolerance.every:g} (every step), {tolerance.first:g} (first step, *), "
          f"{time.perf_counter() - start:.0f} s")
    print(format_table(rows, device))
    failed = [row["stage"] for row in rows if row["error"]]
    print(f"gpu_check: {'FAILED: ' + ', '.join(failed) if failed else 'all stages ok'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
