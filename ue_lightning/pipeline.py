"""`ue pipeline`: the whole data flow (score model, generators, noise files, victims) in one command, with a table.

score estimator -> noise generators (fit, then predict over the train set into noise
files) -> victims trained on clean and on each protected train set (at each adversarial
radius) -> clean test accuracy table. Each stage is the same LightningCLI that
``ue fit/predict/test`` runs, built from the stage's YAML config, in a worker process on one CPU
thread (so the table is the same for any thread count), ``jobs`` stages at once.
"""

from __future__ import annotations

import logging
import multiprocessing
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import yaml

from ue_lightning.callbacks import PerturbationWriter
from ue_lightning.compose import compose
from ue_lightning.console import debugging
from ue_lightning.lightning_cli import check_config, stage_cli
from ue_lightning.scratch import atomic_write_json


def _uses_score_model(configs: list[str]) -> bool:
    for config in configs:
        model = (yaml.safe_load(Path(config).read_text()) or {}).get("model") or {}
        if "score_checkpoint" in (model.get("init_args") or {}):
            return True
    return False


class _Announcer:
    """Announces each stage when it starts, numbered, and says when it ends and how long it took."""

    def __init__(self, total: int):
        self.total, self.started = total, 0

    def start(self, title: str) -> str:
        self.started += 1
        number = f"[{self.started}/{self.total}]"
        print(f"== {number} {title}", flush=True)
        return number

    def end(self, number: str, seconds: float) -> None:
        print(f"   {number} done ({seconds:.0f} s)", flush=True)


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
    jobs: int | None = None,
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
        workdir: where checkpoints (``score.ckpt``; ``generator/<name>.ckpt``, weights, which ``ue protect
            --checkpoint`` takes), noise files (``noise/<name>.safetensors``) and ``results.json`` go.
        jobs: stages run at once, each in its own process on one CPU thread, once its inputs exist (default:
            torch's thread count, i.e. the CPU cores or ``OMP_NUM_THREADS``). The table is the same for any
            ``jobs``: only the time changes. With a GPU, as many as its memory holds (the digits' stages are small).

    Returns:
        ``{train data name: {"rho_a=R": {"train_acc": ..., "test_acc": ...}}}``, accuracies in [0, 1]
        (``test_acc``: on the clean test set, the measure of protection).
    """
    methods = generators if generators is not None else GENERATORS
    for config in [data, *_as_list(score), *_as_list(victim), *(c for m in methods.values() for c in _as_list(m))]:
        check_config(config)
    composed = {name: compose(data, *_as_list(m)) for name, m in methods.items()}
    adv_radii = adv_radii if adv_radii is not None else [0.0]
    jobs = torch.get_num_threads() if jobs is None else jobs
    if jobs < 1:
        raise ValueError(f"jobs={jobs}: at least 1 stage must run at a time")
    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    results = _run_stages(compose(data, *_as_list(score)) if score else None, composed, _as_list(victim),
                          adv_radii, work, jobs)
    print()
    print(format_table(results))
    print(format_verdicts(results))
    return results


def _as_list(configs: str | list[str] | None) -> list[str]:
    return [] if configs is None else [configs] if isinstance(configs, str) else list(configs)


def _names(configs: list[str]) -> str:
    """``data/digits.yaml + generator/rem.yaml + digits/rem.yaml``: each config by its folder and name."""
    return " + ".join("/".join(Path(c).parts[-2:]) for c in configs)


@dataclass
class _Stage:
    """One stage of the pipeline: ``run(*args)`` in a worker process, after the stages named in ``after``."""

    title: str
    run: Callable[..., Any]
    args: tuple
    after: tuple[str, ...] = ()
    cell: tuple[str, str] | None = None  # a victim's row (train data) and column (rho_a) in the table


def _fit_score(configs: list[str], root: Path, checkpoint: Path) -> None:
    cli = stage_cli(configs, root, progress=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    cli.trainer.save_checkpoint(checkpoint, weights_only=True)  # what the generators read: weights


def _fit_generator(configs: list[str], root: Path, extra: list[str], output: Path, checkpoint: Path) -> None:
    cli = stage_cli(configs, root, *extra, progress=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    cli.trainer.save_checkpoint(checkpoint, weights_only=True)  # for `ue protect --checkpoint` (its surrogate)
    cli.trainer.callbacks.append(PerturbationWriter(str(output)))
    cli.trainer.predict(cli.model, datamodule=cli.datamodule, return_predictions=False)


def _train_victim(configs: list[str], root: Path, extra: list[str]) -> dict[str, float]:
    cli = stage_cli(configs, root, *extra, progress=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    train_acc = float(cli.trainer.callback_metrics["train/acc"])  # last epoch, on its (protected) data
    metrics = cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)[0]
    return {"train_acc": train_acc, "test_acc": float(metrics["test/acc"])}


def _one_thread_worker() -> None:
    """A worker computes on one CPU thread: its floats, hence the table, do not depend on the machine's
    thread count (sums over 1 and 2 threads are ordered differently, and training amplifies the difference).
    Lightning's INFO lines are off for the worker's life (see :func:`~ue_lightning.console.lightning_info_off`)."""
    torch.set_num_threads(1)
    if not debugging():
        for name in ("lightning.pytorch", "lightning.fabric"):
            logging.getLogger(name).setLevel(logging.WARNING)


def _stages(score: list[str] | None, generators: dict[str, list[str]], victim: list[str], adv_radii: list[float],
            work: Path) -> dict[str, _Stage]:
    """The pipeline's stages, keyed by name, in the order they are announced when ready."""
    stages: dict[str, _Stage] = {}
    score_ckpt = work / "score.ckpt"
    needs_score = bool(score) and any(_uses_score_model(c) for c in generators.values())
    if needs_score:
        stages["score"] = _Stage(f"score estimator ({_names(score)})", _fit_score, (score, work / "score", score_ckpt))
    noise_files: dict[str, Path | None] = {"clean": None}
    for name, config in generators.items():
        uses_score = needs_score and _uses_score_model(config)
        # absolute: `ue protect --checkpoint <workdir>/generator/<name>.ckpt` finds the score model from anywhere
        extra = ["--model.init_args.score_checkpoint", str(score_ckpt.resolve())] if uses_score else []
        noise_files[name] = work / "noise" / f"{name}.safetensors"
        stages[f"generator {name}"] = _Stage(f"generator {name} ({_names(config)})", _fit_generator,
                                             (config, work / "generator" / name, extra, noise_files[name],
                                              work / "generator" / f"{name}.ckpt"),
                                             ("score",) if uses_score else ())
    for data_name, noise in noise_files.items():
        for radius in adv_radii:
            extra = ["--model.init_args.adv_radius", str(radius)]
            if noise is not None:
                extra += ["--data.perturbation", str(noise)]
            stages[f"victim {data_name} {radius:g}"] = _Stage(
                f"victim on {data_name} data, rho_a = {radius:g}/255", _train_victim,
                (victim, work / "victim" / f"{data_name}-rho{radius:g}", extra),
                () if noise is None else (f"generator {data_name}",), (data_name, f"rho_a={radius:g}"))
    return stages


def _run_stages(score: list[str] | None, generators: dict[str, list[str]], victim: list[str], adv_radii: list[float],
                work: Path, jobs: int) -> dict[str, dict[str, dict[str, float]]]:
    """Run the stages, ``jobs`` at once (each in a worker process on one thread), each once its inputs exist."""
    stages = _stages(score, generators, victim, adv_radii, work)
    announce = _Announcer(len(stages))
    done: dict[str, Any] = {}  # stage name -> what it returned
    running: dict[Future, tuple[str, str, float]] = {}  # -> stage name, its number, its start time
    context = multiprocessing.get_context("spawn")  # never fork a process whose OpenMP threads have run
    with ProcessPoolExecutor(max_workers=jobs, mp_context=context, initializer=_one_thread_worker) as pool:
        try:
            while len(done) < len(stages):
                started = set(done) | {name for name, _, _ in running.values()}
                ready = [n for n, stage in stages.items() if n not in started and set(stage.after) <= set(done)]
                for name in ready[:jobs - len(running)]:  # in the stages' order
                    number = announce.start(stages[name].title)
                    running[pool.submit(stages[name].run, *stages[name].args)] = (name, number, time.time())
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in finished:
                    name, number, start = running.pop(future)
                    done[name] = future.result()  # a stage's error is raised here, with its traceback
                    announce.end(number, time.time() - start)
                    if stages[name].cell:
                        atomic_write_json(work / "results.json", _results(stages, done))
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise
    return _results(stages, done)


def _results(stages: dict[str, _Stage], done: dict[str, Any]) -> dict[str, dict[str, dict[str, float]]]:
    """The victims' accuracies so far, rows in the stages' order (clean first, then each generator)."""
    results: dict[str, dict[str, dict[str, float]]] = {}
    for name, stage in stages.items():
        if stage.cell and name in done:
            row, column = stage.cell
            results.setdefault(row, {})[column] = done[name]
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
