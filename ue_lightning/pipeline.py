"""`ue pipeline`: the whole data flow (score model, generators, noise files, victims) in one command, with a table.

score estimator -> noise generators (fit, then predict over the train set into noise
files) -> victims trained on clean and on each protected train set (at each adversarial
radius) -> clean test accuracy table. The pipeline is a grid (:mod:`ue_lightning.grid`): it writes
``<workdir>/pipeline.yaml`` and runs that grid's stages, each the same LightningCLI that ``ue fit/predict/test``
runs, in a worker process on one CPU thread (so the table is the same for any thread count), ``jobs`` stages at
once; a rerun reuses the stages already done.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
import yaml

from ue_lightning.compose import compose
from ue_lightning.grid.execute import Progress, log_file, run_local
from ue_lightning.grid.spec import Grid, Stage, load_grid
from ue_lightning.lightning_cli import check_config
from ue_lightning.scratch import atomic_write_json


def uses_score_model(configs: str | list[str]) -> bool:
    """Whether any of these generator configs sets ``model.init_args.score_checkpoint`` (data collapse)."""
    for config in config_list(configs):
        model = (yaml.safe_load(Path(config).read_text()) or {}).get("model") or {}
        if "score_checkpoint" in (model.get("init_args") or {}):
            return True
    return False


#: The default generators, each composed with ``data`` (collapse is REM's loop plus the score step).
GENERATORS: dict[str, str | list[str]] = {
    "em-classwise": "configs/generator/em-classwise.yaml", "tue": "configs/generator/tue.yaml",
    "em-samplewise": "configs/generator/em-samplewise.yaml", "rem": "configs/generator/rem.yaml",
    "collapse": ["configs/generator/rem.yaml", "configs/generator/collapse.yaml"]}
#: The grid file the pipeline writes in its workdir (``ue grid status|table`` read it too).
GRID_FILE = "pipeline.yaml"


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
        data: the data config of every stage; each generator and score config is composed with it, and with its
            overlay for it where there is one (``ue_lightning.compose``); the victim's config comes after it.
        score: ScoreEstimator config (None: skip, for generators that need no score model).
        generators: name -> generator config (default: EM class-wise, TUE, EM sample-wise, REM and collapse
            on the embedded digits; collapse is ``[rem.yaml, collapse.yaml]``, REM's loop plus the score step).
        victim: VictimClassifier config (its data section, merged over ``data``, is what the victims train on).
        adv_radii: adversarial-training radii of the victims, in 1/255 units (0: standard training).
        workdir: where the grid file (``pipeline.yaml``), each stage's folder (``score/``, ``noise/``, ``cells/``,
            named by hashes of their settings, each with its ``log.txt``) and ``results.json`` go, with links by
            name: ``noise/<name>.safetensors``, ``generator/<name>.ckpt`` (which ``ue protect --checkpoint``
            takes) and ``score.ckpt``. A rerun reuses every stage already done with the same settings.
        jobs: stages run at once, each in its own process on one CPU thread, once its inputs exist (default:
            torch's thread count, i.e. the CPU cores or ``OMP_NUM_THREADS``). The table is the same for any
            ``jobs``: only the time changes. With a GPU, as many as its memory holds (the digits' stages are small).

    Returns:
        ``{train data name: {"rho_a=R": {"train_acc": ..., "test_acc": ...}}}``, accuracies in [0, 1]
        (``test_acc``: on the clean test set, the measure of protection).
    """
    methods = generators if generators is not None else GENERATORS
    for config in [data, *config_list(score), *config_list(victim), *(c for m in methods.values() for c in config_list(m))]:
        check_config(config)
    jobs = torch.get_num_threads() if jobs is None else jobs
    if jobs < 1:
        raise ValueError(f"jobs={jobs}: at least 1 stage must run at a time")
    work = Path(workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    raw = pipeline_grid(data, score, methods, victim, adv_radii if adv_radii is not None else [0.0], work)
    (work / GRID_FILE).write_text(yaml.safe_dump(raw, sort_keys=False))
    grid = load_grid(work / GRID_FILE)
    stages = list(grid.stages.values())
    titles = _titles(grid, data, score, methods)
    links = _named_links(grid, work)
    _refuse_files_in_the_way(links, work)
    reused = sum(stage.done() for stage in stages)
    if reused:
        print(f"{reused} of {len(stages)} stages already done in {work} (reused; delete the folder to run "
              "them again)", flush=True)
    failed = run_local(stages, jobs, threads=1, progress=PipelineProgress(titles, len(stages) - reused))
    if failed:
        raise RuntimeError(f"{len(failed)} stage(s) failed: " + "; ".join(
            f"{titles[s.key]} (log: {log_file(s)})" for s in failed) + ": run the same command again to retry them")
    _link_by_name(links)
    results = _results(grid)
    atomic_write_json(work / "results.json", results)
    print()
    print(format_table(results))
    print(format_verdicts(results))
    return results


def pipeline_grid(data: str, score: str | list[str] | None, generators: dict[str, str | list[str]],
                  victim: str | list[str], adv_radii: list[float], workdir: Path) -> dict:
    """The grid file of a pipeline: one dataset, clean data and each generator as sources, one victim, its radii."""
    sources: dict = {"clean": None}
    for name, configs in generators.items():
        sources[name] = {"generator": configs}
        if score and uses_score_model(configs):
            sources[name]["score"] = score
    return {"name": "pipeline", "output": str(workdir), "datasets": {Path(data).stem: data}, "sources": sources,
            "victims": {Path(config_list(victim)[-1]).stem: victim}, "adv_radii": [float(r) for r in adv_radii]}


def config_list(configs: str | list[str] | None) -> list[str]:
    """One config path, a list of them (merged in order) or none, as a list."""
    return [] if configs is None else [configs] if isinstance(configs, str) else list(configs)


def _names(configs: list[str]) -> str:
    """``data/digits.yaml + generator/rem.yaml + digits/rem.yaml``: each config by its folder and name."""
    return " + ".join("/".join(Path(c).parts[-2:]) for c in configs)


def _titles(grid: Grid, data: str, score: str | list[str] | None, generators: dict[str, str | list[str]]
            ) -> dict[str, str]:
    """Each stage's line: ``score estimator (configs)``, ``generator rem (configs)``, ``victim on rem data, ...``."""
    titles = {}
    for cell in grid.cells:
        victim = grid.victim(cell)
        titles[victim.key] = f"victim on {cell['source']} data, rho_a = {cell['adv_radius']:g}/255"
        if victim.needs:
            generator = grid.stages[victim.needs[0]]
            configs = compose(data, *config_list(generators[cell["source"]]))
            titles[generator.key] = f"generator {cell['source']} ({_names(configs)})"
            for need in generator.needs:
                titles[need] = f"score estimator ({_names(compose(data, *config_list(score)))})"
    return titles


class PipelineProgress(Progress):
    """The pipeline's lines: ``== [i/N] title`` when a stage starts, ``   [i/N] done (S s)`` when it ends."""

    def __init__(self, titles: dict[str, str], total: int):
        self.titles, self.total = titles, total
        self.numbers: dict[str, str] = {}
        self.started: dict[str, float] = {}

    def note(self, text: str) -> None:
        pass  # one thread a stage is the pipeline's rule, not news

    def start(self, stage: Stage) -> None:
        self.numbers[stage.key] = f"[{len(self.numbers) + 1}/{self.total}]"
        self.started[stage.key] = time.time()
        print(f"== {self.numbers[stage.key]} {self.titles[stage.key]}", flush=True)

    def done(self, stage: Stage, minutes: float) -> None:
        print(f"   {self.numbers[stage.key]} done ({time.time() - self.started[stage.key]:.0f} s)", flush=True)

    def failed(self, stage: Stage, error: BaseException) -> None:
        print(f"   {self.numbers[stage.key]} FAILED: {type(error).__name__}: {error} (log: {log_file(stage)})",
              flush=True)

    def skipped(self, stage: Stage) -> None:
        print(f"   skipped: {self.titles[stage.key]} (an input failed)", flush=True)

    def stopped(self) -> None:
        print("stopped: ending the running stages (a rerun resumes them from their checkpoints)", flush=True)


def _named_links(grid: Grid, work: Path) -> dict[Path, Path]:
    """link -> target: each generator's noise file and checkpoint, and the score model's checkpoint, by name."""
    links = {}
    for cell in grid.cells:
        victim = grid.victim(cell)
        if victim.needs:
            generator = grid.stages[victim.needs[0]]
            links[work / "noise" / f"{cell['source']}.safetensors"] = generator.result
            links[work / "generator" / f"{cell['source']}.ckpt"] = generator.checkpoint
            for need in generator.needs:
                links[work / "score.ckpt"] = grid.stages[need].checkpoint
    return links


def _refuse_files_in_the_way(links: dict[Path, Path], work: Path) -> None:
    """Refuse, before anything runs, a workdir where a link would replace a file (an earlier pipeline's results)."""
    for link in links:
        if link.exists() and not link.is_symlink():
            raise FileExistsError(f"--workdir {work} holds {link}, a file that the pipeline's link by that name "
                                  "would replace (an earlier `ue pipeline` wrote it): move it away or give a new "
                                  "--workdir (nothing was run)")


def _link_by_name(links: dict[Path, Path]) -> None:
    """Each ``link`` -> its target as a relative symbolic link, replacing an older link."""
    for link, target in links.items():
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink():
            link.unlink()
        link.symlink_to(os.path.relpath(target, link.parent))


def _results(grid: Grid) -> dict[str, dict[str, dict[str, float]]]:
    """The victims' accuracies, rows in the grid's order (clean first, then each generator), a column a radius."""
    results: dict[str, dict[str, dict[str, float]]] = {}
    for cell in grid.cells:
        metrics = json.loads(grid.victim(cell).result.read_text())
        results.setdefault(cell["source"], {})[f"rho_a={cell['adv_radius']:g}"] = {
            "train_acc": metrics["train_acc"], "test_acc": metrics["test_acc"]}
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
