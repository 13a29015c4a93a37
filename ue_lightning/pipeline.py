"""`ue pipeline`: the whole data flow (score model, generators, noise files, victims) in one command, with a table.

score estimator -> noise generators (fit, then predict over the train set into noise
files) -> victims trained on clean and on each protected train set (at each adversarial
radius) -> clean test accuracy table. Each stage is the same LightningCLI that
``ue fit/predict/test`` runs, built from the stage's YAML config.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator
from unittest.mock import patch

import yaml

from ue_lightning.callbacks import PerturbationWriter
from ue_lightning.lightning_cli import build_cli


def _check_config(path: str) -> str:
    if not Path(path).is_file():
        raise FileNotFoundError(f"config {path} not found: run `ue pipeline` from the repository root "
                                "(configs/ lives there) or pass the config paths explicitly")
    return path


def _uses_score_model(config: str) -> bool:
    model = (yaml.safe_load(Path(config).read_text()) or {}).get("model", {})
    return "score_checkpoint" in (model.get("init_args") or {})


def stage_cli(config: str, root: Path, *overrides: str):
    """The LightningCLI of one stage (not run): ``config`` plus ``overrides``, writing only below ``root``,
    logging to CSV (``root/logs``), no checkpoints, no progress bar. The notebook uses it too."""
    # The configs' callbacks write checkpoints and noise files to their own runs/ folders; the pipeline keeps
    # its models in memory and writes everything it keeps below its workdir instead.
    args = ["--config", _check_config(config), "--trainer.default_root_dir", str(root),
            "--trainer.callbacks", "[]", "--trainer.enable_checkpointing", "false",
            "--trainer.logger", json.dumps({"class_path": "lightning.pytorch.loggers.CSVLogger",
                                            "init_args": {"save_dir": str(root), "name": "logs"}}),
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false", *overrides]
    with patch.object(sys, "argv", sys.argv[:1]):  # the stage's arguments are `args`, not `ue pipeline ...`
        return build_cli(args, run=False)


@contextmanager
def _stage(title: str) -> Iterator[None]:
    """Announce a stage and say how long it took."""
    print(f"== {title}", flush=True)
    start = time.time()
    yield
    print(f"   ({time.time() - start:.0f} s)", flush=True)


def _write_json(path: Path, data: dict) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, path)


def run_pipeline(
    score: str | None = "configs/score/digits.yaml",
    generators: dict[str, str] | None = None,
    victim: str = "configs/victim/digits.yaml",
    adv_radii: list[float] | None = None,
    workdir: str = "runs/pipeline/digits",
) -> dict[str, dict[str, float]]:
    """Run score estimator, generators, noise files and victims; print the accuracy table.

    Args:
        score: ScoreEstimator config (None: skip, for generators that need no score model).
        generators: name -> generator config (default: EM class-wise, TUE, EM sample-wise, REM and
            collapse on the embedded digits).
        victim: VictimClassifier config (its data section is the one the victims train on).
        adv_radii: adversarial-training radii of the victims, in 1/255 units (0: standard training).
        workdir: where checkpoints, noise files and ``results.json`` go.

    Returns:
        ``{train data name: {"rho_a=R": {"train_acc": ..., "test_acc": ...}}}``, accuracies in [0, 1]
        (``test_acc``: on the clean test set, the measure of protection).
    """
    generators = generators if generators is not None else {
        name: f"configs/generator/{name}-digits.yaml"
        for name in ("em-classwise", "tue", "em-samplewise", "rem", "collapse")}
    adv_radii = adv_radii if adv_radii is not None else [0.0]
    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    # The pipeline prints its own stage lines and table: Lightning's per-stage INFO lines (devices, seed,
    # stop reasons) would repeat at every stage. Its warnings still show.
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for config in [c for c in (score, victim, *generators.values()) if c]:
        _check_config(config)

    score_ckpt = None
    if score and any(_uses_score_model(c) for c in generators.values()):
        with _stage(f"score estimator ({score})"):
            cli = stage_cli(score, work / "score")
            cli.trainer.fit(cli.model, datamodule=cli.datamodule)
            score_ckpt = work / "score.ckpt"
            cli.trainer.save_checkpoint(score_ckpt)

    noise_files: dict[str, Path] = {}
    for name, config in generators.items():
        extra = ["--model.init_args.score_checkpoint", str(score_ckpt)] if _uses_score_model(config) and score_ckpt else []
        output = work / "noise" / f"{name}.safetensors"
        with _stage(f"generator {name} ({config})"):
            cli = stage_cli(config, work / "generator" / name, *extra)
            cli.trainer.fit(cli.model, datamodule=cli.datamodule)
            cli.trainer.callbacks.append(PerturbationWriter(str(output)))
            cli.trainer.predict(cli.model, datamodule=cli.datamodule, return_predictions=False)
        noise_files[name] = output

    results: dict[str, dict[str, dict[str, float]]] = {}
    for data_name, noise in [("clean", None), *noise_files.items()]:
        for radius in adv_radii:
            extra = ["--model.init_args.adv_radius", str(radius)]
            if noise is not None:
                extra += ["--data.perturbation", str(noise)]
            with _stage(f"victim on {data_name} data, rho_a = {radius:g}/255"):
                cli = stage_cli(victim, work / "victim" / f"{data_name}-rho{radius:g}", *extra)
                cli.trainer.fit(cli.model, datamodule=cli.datamodule)
                train_acc = float(cli.trainer.callback_metrics["train/acc"])  # last epoch, on its (protected) data
                metrics = cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)[0]
            cell = {"train_acc": train_acc, "test_acc": float(metrics["test/acc"])}
            results.setdefault(data_name, {})[f"rho_a={radius:g}"] = cell
            _write_json(work / "results.json", results)

    print(format_table(results))
    print(format_verdicts(results))
    return results


def format_table(results: dict[str, dict[str, dict[str, float]]]) -> str:
    """Markdown table: rows = train data, columns = adversarial radius, cells = train / clean test accuracy (%)."""
    columns = list(next(iter(results.values())).keys())
    lines = ["| train data | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for name, row in results.items():
        cells = [f"{100 * row[c]['train_acc']:.1f} / {100 * row[c]['test_acc']:.1f}" for c in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "victims: train accuracy (last epoch, on the data they trained on) / clean test accuracy (%)\n" + "\n".join(lines)


def verdict(protected: float, clean: float) -> str:
    """One word for a drop in clean test accuracy (both in [0, 1])."""
    drop = clean - protected
    if drop >= 0.4:
        return "protected"
    if drop >= 0.1:
        return "partly protected"
    return "NOT protected"


def format_verdicts(results: dict[str, dict[str, dict[str, float]]]) -> str:
    """A line per noise and radius: its victim's clean test accuracy against the clean victim's."""
    lines = []
    for name, row in results.items():
        if name == "clean":
            continue
        for column, cell in row.items():
            clean = results["clean"][column]["test_acc"]
            radius = "" if column == "rho_a=0" else f" ({column}/255)"
            lines.append(f"{name}{radius}: {100 * cell['test_acc']:.1f}% vs {100 * clean:.1f}% on clean data "
                         f"-> {verdict(cell['test_acc'], clean)}")
    return "\n".join(lines)
