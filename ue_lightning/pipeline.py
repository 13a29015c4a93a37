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

import yaml

from ue_lightning.callbacks import PerturbationWriter
from ue_lightning.compose import compose
from ue_lightning.console import TransientProgressBar, debugging
from ue_lightning.lightning_cli import build_cli


def _check_config(path: str) -> str:
    if not Path(path).is_file():
        raise FileNotFoundError(f"config {path} not found: run `ue pipeline` from the repository root "
                                "(configs/ lives there) or pass the config paths explicitly")
    return path


def _uses_score_model(configs: list[str]) -> bool:
    for config in configs:
        model = (yaml.safe_load(Path(config).read_text()) or {}).get("model") or {}
        if "score_checkpoint" in (model.get("init_args") or {}):
            return True
    return False


def stage_cli(config: str | list[str], root: Path, *overrides: str):
    """The LightningCLI of one stage (not run): ``config`` (one path, or several merged in order) plus
    ``overrides``, writing only below ``root``, logging to CSV (``root/logs``), no checkpoints, no progress bar.
    The notebook uses it too."""
    # The configs' callbacks write checkpoints and noise files to their own runs/ folders; the pipeline keeps
    # its models in memory and writes everything it keeps below its workdir instead. Lightning's bars are
    # shown on a terminal only, and cleared after each loop: the stage lines are the pipeline's record.
    terminal = sys.stdout.isatty()
    callbacks = [{"class_path": f"{TransientProgressBar.__module__}.TransientProgressBar"}] if terminal else []
    configs = [config] if isinstance(config, str) else list(config)
    args = [*(a for c in configs for a in ("--config", _check_config(c))), "--trainer.default_root_dir", str(root),
            "--trainer.callbacks", json.dumps(callbacks), "--trainer.enable_checkpointing", "false",
            "--trainer.logger", json.dumps({"class_path": "lightning.pytorch.loggers.CSVLogger",
                                            "init_args": {"save_dir": str(root), "name": "logs"}}),
            "--trainer.enable_progress_bar", json.dumps(terminal), "--trainer.enable_model_summary", "false",
            *overrides]
    return build_cli(args, run=False)


class _Stages:
    """Announces each stage, numbered, and says how long it took."""

    def __init__(self, total: int):
        self.total, self.done = total, 0

    @contextmanager
    def __call__(self, title: str) -> Iterator[None]:
        self.done += 1
        print(f"== [{self.done}/{self.total}] {title}", flush=True)
        start = time.time()
        yield
        print(f"   ({time.time() - start:.0f} s)", flush=True)


@contextmanager
def _lightning_info_off() -> Iterator[None]:
    """Lightning's INFO lines (devices, seed, stop reasons) off while the stages run: they would repeat at
    every stage, and the pipeline prints its own stage lines. Its warnings still show; UE_DEBUG=1 shows all."""
    loggers = [] if debugging() else [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _write_json(path: Path, data: dict) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, path)


#: The default generators, each composed with ``data`` (collapse is REM's loop plus the score step).
GENERATORS: dict[str, str | list[str]] = {
    "em-classwise": "configs/generator/em-classwise.yaml", "tue": "configs/generator/tue.yaml",
    "em-samplewise": "configs/generator/em-samplewise.yaml", "rem": "configs/generator/rem.yaml",
    "collapse": ["configs/generator/rem.yaml", "configs/generator/collapse.yaml"]}


def run_pipeline(
    data: str = "configs/data/digits.yaml",
    score: str | list[str] | None = "configs/score/dsm.yaml",
    generators: dict[str, str | list[str]] | None = None,
    victim: str | list[str] = "configs/victim/digits.yaml",
    adv_radii: list[float] | None = None,
    workdir: str = "runs/pipeline/digits",
) -> dict[str, dict[str, float]]:
    """Run score estimator, generators, noise files and victims; print the accuracy table.

    Each of ``score``, a generator and ``victim`` is one config or several, merged in order.

    Args:
        data: the data config of the score estimator and the generators; each of their configs is composed
            with it, and with its overlay for it where there is one (``ue_lightning.compose``).
        score: ScoreEstimator config (None: skip, for generators that need no score model).
        generators: name -> generator config (default: EM class-wise, TUE, EM sample-wise, REM and collapse
            on the embedded digits; collapse is ``[rem.yaml, collapse.yaml]``, REM's loop plus the score step).
        victim: VictimClassifier config, whole (its data section is the one the victims train on).
        adv_radii: adversarial-training radii of the victims, in 1/255 units (0: standard training).
        workdir: where checkpoints, noise files and ``results.json`` go.

    Returns:
        ``{train data name: {"rho_a=R": {"train_acc": ..., "test_acc": ...}}}``, accuracies in [0, 1]
        (``test_acc``: on the clean test set, the measure of protection).
    """
    methods = generators if generators is not None else GENERATORS
    for config in [data, *_as_list(score), *_as_list(victim), *(c for m in methods.values() for c in _as_list(m))]:
        _check_config(config)
    composed = {name: compose(data, *_as_list(m)) for name, m in methods.items()}
    adv_radii = adv_radii if adv_radii is not None else [0.0]
    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    with _lightning_info_off():
        results = _run_stages(compose(data, *_as_list(score)) if score else None, composed, _as_list(victim),
                              adv_radii, work)
    print()
    print(format_table(results))
    print(format_verdicts(results))
    return results


def _as_list(configs: str | list[str] | None) -> list[str]:
    return [] if configs is None else [configs] if isinstance(configs, str) else list(configs)


def _names(configs: list[str]) -> str:
    """``data/digits.yaml + generator/rem.yaml + digits/rem.yaml``: each config by its folder and name."""
    return " + ".join("/".join(Path(c).parts[-2:]) for c in configs)


def _run_stages(score: list[str] | None, generators: dict[str, list[str]], victim: list[str], adv_radii: list[float],
                work: Path) -> dict[str, dict[str, dict[str, float]]]:
    needs_score = bool(score) and any(_uses_score_model(c) for c in generators.values())
    stage = _Stages(needs_score + len(generators) + (1 + len(generators)) * len(adv_radii))
    score_ckpt = None
    if needs_score:
        with stage(f"score estimator ({_names(score)})"):
            cli = stage_cli(score, work / "score")
            cli.trainer.fit(cli.model, datamodule=cli.datamodule)
            score_ckpt = work / "score.ckpt"
            cli.trainer.save_checkpoint(score_ckpt, weights_only=True)  # what the generators read: weights

    noise_files: dict[str, Path] = {}
    for name, config in generators.items():
        extra = ["--model.init_args.score_checkpoint", str(score_ckpt)] if _uses_score_model(config) and score_ckpt else []
        output = work / "noise" / f"{name}.safetensors"
        with stage(f"generator {name} ({_names(config)})"):
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
            with stage(f"victim on {data_name} data, rho_a = {radius:g}/255"):
                cli = stage_cli(victim, work / "victim" / f"{data_name}-rho{radius:g}", *extra)
                cli.trainer.fit(cli.model, datamodule=cli.datamodule)
                train_acc = float(cli.trainer.callback_metrics["train/acc"])  # last epoch, on its (protected) data
                metrics = cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)[0]
            cell = {"train_acc": train_acc, "test_acc": float(metrics["test/acc"])}
            results.setdefault(data_name, {})[f"rho_a={radius:g}"] = cell
            _write_json(work / "results.json", results)
    return results


def format_table(results: dict[str, dict[str, dict[str, float]]]) -> str:
    """Markdown table: rows = train data, columns = adversarial radius, cells = train / clean test accuracy (%).

    Columns are padded to a common width, so the table reads as well on a console as rendered.
    """
    columns = list(next(iter(results.values())).keys())
    rows = [["train data", *columns]]
    for name, row in results.items():
        rows.append([name, *(f"{100 * row[c]['train_acc']:4.1f} / {100 * row[c]['test_acc']:4.1f}" for c in columns)])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(cell.ljust(width) for cell, width in zip(row, widths)) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (width + 2) for width in widths) + "|")
    caption = "victims: train accuracy (last epoch, on the data they trained on) / clean test accuracy (%)"
    return "\n".join([caption, *lines])


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
    labels, lines = [], []
    for name, row in results.items():
        if name == "clean":
            continue
        for column, cell in row.items():
            clean = results["clean"][column]["test_acc"]
            labels.append(name + ("" if column == "rho_a=0" else f" ({column}/255)") + ":")
            lines.append(f"{100 * cell['test_acc']:4.1f}% vs {100 * clean:.1f}% on clean data "
                         f"-> {verdict(cell['test_acc'], clean)}")
    width = max(map(len, labels), default=0)
    return "\n".join(f"{label:<{width}} {line}" for label, line in zip(labels, lines))
