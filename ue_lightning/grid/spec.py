"""A grid file: its YAML format, and its expansion into cells and the stages that make them.

A cell is one victim: (dataset, noise source, surrogate, victim, adversarial radius, defence,
protected fraction, seed). The stages behind it are the score model (data collapse only),
the noise generator (fit + predict, one noise file) and the victim (fit + test). Every stage
is named by a hash of its resolved settings (the parsed YAML of its configs, the overrides
that change them and the stages it reads) and lives in ``<output>/{score,noise,cells}/<hash>``:
cells that share a generator share its noise file, grids that share an output folder share
their common stages, a changed config makes new stages instead of reusing stale ones, and
renaming or reordering the entries of a grid changes nothing.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ue_lightning.compose import compose

#: A cell's coordinates, in table order.
AXES = ("dataset", "source", "surrogate", "victim", "adv_radius", "defence", "protected_fraction", "seed")
#: Grid-file key of each axis.
AXIS_KEYS = {"datasets": "dataset", "sources": "source", "surrogates": "surrogate", "victims": "victim",
             "adv_radii": "adv_radius", "defences": "defence", "protected_fractions": "protected_fraction",
             "seeds": "seed"}
#: Axes a clean (unprotected) cell has no value for.
NOT_FOR_CLEAN = ("surrogate", "protected_fraction")
#: A source's value for "the clean rest alone": at each protected fraction, a victim trained on the samples that
#: fraction leaves clean, without the protected ones (``data.drop_protected``): the baseline of partial protection.
CLEAN_REST = "clean-rest"
ARG_KEYS = ("victim_args", "generator_args")
TOP_KEYS = {"name", "output", *AXIS_KEYS, *ARG_KEYS, "parts", "slurm"}
STAGE_KINDS = ("score", "generator", "victim")
_PLACEHOLDER = re.compile(r"\{(" + "|".join(AXES) + r")\}")


@dataclass
class Stage:
    """One LightningCLI run (fit, then predict or test), everything it needs to run in another process.

    ``configs`` and ``args`` are what ``ue fit`` would take; ``folder`` receives its resolved
    ``config.yaml``, checkpoints, logs and its result; ``needs`` names the stages whose
    results it reads (by ``key``).
    """

    kind: str
    key: str
    name: str
    folder: str
    configs: list[str]
    args: list[str]
    cwd: str
    needs: list[str] = field(default_factory=list)
    checkpoint_every: dict = field(default_factory=dict)  # how often its config's ModelCheckpoint saves
    cell: dict | None = None  # victims: the cell's coordinates

    @property
    def result(self) -> Path:
        """The file whose presence means the stage is done (written last, atomically)."""
        name = {"score": "fit.json", "generator": "noise.safetensors", "victim": "metrics.json"}[self.kind]
        return Path(self.folder) / name

    @property
    def checkpoint(self) -> Path:
        """The stage's checkpoint: the latest during fit (to resume from), the fitted model after it."""
        return Path(self.folder) / "checkpoints" / "last.ckpt"

    def done(self) -> bool:
        return self.result.exists()


@dataclass
class Grid:
    path: Path
    name: str
    output: Path
    cells: list[dict]  # coordinates, in grid order, with "key" (the victim stage) added
    stages: dict[str, Stage]  # by key, in run order (scores, generators, victims)
    order: dict[str, list]  # axis -> its values in the grid file's order
    slurm: dict

    def victim(self, cell: dict) -> Stage:
        return self.stages[cell["key"]]


def stable_hash(obj: Any) -> str:
    """A short hash of a JSON-able object that does not depend on key order."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def cli_args(overrides: dict) -> list[str]:
    """``{"model.init_args.width": 4}`` -> ``["--model.init_args.width", "4"]``, values as jsonargparse reads them."""
    out = []
    for key, value in overrides.items():
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif value is None:
            text = "null"
        elif isinstance(value, (list, dict)):
            text = json.dumps(value)
        else:
            text = str(value)
        out += [f"--{key.removeprefix('--')}", text]
    return out


def _fill(obj: Any, cell: dict) -> Any:
    """Replace ``{dataset}``, ``{source}``, ... in the strings of ``obj`` by the cell's values."""
    if isinstance(obj, str):
        return _PLACEHOLDER.sub(lambda m: str(cell[m.group(1)]), obj)
    if isinstance(obj, list):
        return [_fill(v, cell) for v in obj]
    if isinstance(obj, dict):
        return {k: _fill(v, cell) for k, v in obj.items()}
    return obj


def _as_list(value: Any) -> list:
    return [] if value is None else list(value) if isinstance(value, (list, tuple)) else [value]


def _normalise_entries(axis: str, raw: Any) -> dict[str, dict]:
    """A mapping axis (datasets, sources, victims, surrogates) as ``{name: {config/generator/score, args}}``.

    A config is a path or a list of paths merged in order; a source's generator and score configs are composed
    with the dataset's (``ue_lightning.compose``: the dataset's configs, then each one and its overlay)."""
    if axis == "surrogate" and isinstance(raw, list):  # [vgg16, resnet18]: the generators' architecture
        return {str(a): {"args": {"model.init_args.arch": a}} for a in raw}
    if not isinstance(raw, dict) or not raw:
        raise ValueError(f"grid: `{axis}s` must be a non-empty mapping of name -> settings, got {raw!r}")
    out = {}
    for name, spec in raw.items():
        if axis == "source" and spec in (None, "clean"):
            spec = {}
        elif axis == "source" and spec == CLEAN_REST:
            spec = {"clean_rest": True}
        elif isinstance(spec, (str, list)):  # a config, or configs merged in order
            spec = {"generator" if axis == "source" else "config": spec}
        elif axis == "surrogate" and isinstance(spec, dict) and "args" not in spec:
            spec = {"args": spec}
        if not isinstance(spec, dict):
            raise ValueError(f"grid: {axis} {name!r}: expected a config path, a list of them or a mapping, "
                             f"got {spec!r}")
        allowed = {"source": {"generator", "score", "args", "clean_rest"}, "surrogate": {"args"}}.get(axis, {"config", "args"})
        if set(spec) - allowed:
            raise ValueError(f"grid: {axis} {name!r}: unknown keys {sorted(set(spec) - allowed)} "
                             f"(allowed: {sorted(allowed)})")
        if axis == "source" and "score" in spec and "generator" not in spec:
            raise ValueError(f"grid: source {name!r} has a score model but no generator")
        out[str(name)] = {**spec, "args": dict(spec.get("args") or {})}
    return out


def _select(axis: str, base: Any, part_value: Any) -> Any:
    """A part's value of an axis: a list of names picks from the top-level mapping, anything else replaces it."""
    if isinstance(base, dict) and isinstance(part_value, list):
        missing = [n for n in part_value if str(n) not in map(str, base)]
        if missing:
            raise ValueError(f"grid: a part names {axis} {missing}, not among {list(base)}")
        return {str(k): v for k, v in base.items() if str(k) in map(str, part_value)}
    return part_value


def _load_yaml(path: str, what: str) -> dict:
    if not Path(path).is_file():
        raise FileNotFoundError(f"grid: {what} {path} not found (paths in a grid file are relative to the "
                                "directory `ue grid` runs in: the repository root)")
    return yaml.safe_load(Path(path).read_text()) or {}


def _checkpoint_settings(configs: list[dict]) -> dict:
    """How often the configs' ModelCheckpoint saves (``every_n_train_steps`` etc.): the grid keeps that
    rhythm for its own ``last.ckpt``, so a killed stage resumes where its config says it may."""
    keep = ("every_n_train_steps", "every_n_epochs", "train_time_interval")
    out: dict = {}
    for config in configs:
        for callback in ((config.get("trainer") or {}).get("callbacks") or []):
            if isinstance(callback, dict) and str(callback.get("class_path", "")).endswith("ModelCheckpoint"):
                out.update({k: v for k, v in (callback.get("init_args") or {}).items() if k in keep})
    return out


_MISSING = object()


def _lookup(contents: list[dict], dotted: str) -> Any:
    """The value the configs (the last that sets it) give a dotted key, or ``_MISSING``."""
    for content in reversed(contents):
        node: Any = content
        for part in dotted.split("."):
            node = node.get(part, _MISSING) if isinstance(node, dict) else _MISSING
        if node is not _MISSING:
            return node
    return _MISSING


def _changes(overrides: dict, contents: list[dict]) -> dict:
    """The overrides that change what the configs say: ``arch: resnet18`` on a ResNet-18 config is no change, so a
    grid that names the surrogate shares its noise file with one that does not."""
    return {k: v for k, v in overrides.items() if _lookup(contents, k) != v}


def _needs_score(contents: list[dict]) -> bool:
    return _lookup(contents, "model.init_args.score_checkpoint") is not _MISSING


def read_grid_file(path: str | Path) -> dict:
    raw = yaml.safe_load(Path(path).read_text())
    if not isinstance(raw, dict):
        raise ValueError(f"grid: {path} is not a YAML mapping")
    unknown = set(raw) - TOP_KEYS
    if unknown:
        raise ValueError(f"grid: {path}: unknown keys {sorted(unknown)} (allowed: {sorted(TOP_KEYS)})")
    for key in ("datasets", "sources", "victims"):
        if key not in raw:
            raise ValueError(f"grid: {path} needs `{key}`")
    return raw


def _parts(raw: dict) -> list[dict]:
    """The grid's products: the top level alone, or the top level overridden by each of ``parts``."""
    base = {k: v for k, v in raw.items() if k in AXIS_KEYS or k in ARG_KEYS}
    parts = raw.get("parts") or [{}]
    out = []
    for i, part in enumerate(parts):
        part = part or {}
        unknown = set(part) - set(AXIS_KEYS) - set(ARG_KEYS)
        if unknown:
            raise ValueError(f"grid: part {i}: unknown keys {sorted(unknown)}")
        merged = copy.deepcopy(base)
        for key, value in part.items():
            if key in ARG_KEYS:
                merged[key] = {**(merged.get(key) or {}), **(value or {})}
            else:
                merged[key] = _select(AXIS_KEYS[key], base.get(key), value)
        out.append(merged)
    return out


class _Planner:
    """Builds the stages of a grid's cells, sharing score models and generators between cells."""

    def __init__(self, output: Path, cwd: str):
        self.output, self.cwd = output, cwd
        self.stages: dict[str, Stage] = {}
        self._yaml: dict[str, dict] = {}

    def _config(self, path: str, what: str) -> tuple[str, dict]:
        absolute = os.path.abspath(path)
        if absolute not in self._yaml:
            self._yaml[absolute] = _load_yaml(path, what)
        return absolute, self._yaml[absolute]

    def _add(self, stage: Stage) -> Stage:
        return self.stages.setdefault(stage.key, stage)

    def _composed(self, dataset: dict, configs: Any, what: str) -> tuple[list[str], list[dict]]:
        """The dataset's configs, then each of ``configs`` followed by its overlay for that data where there is one
        (``ue_lightning.compose``), as paths and parsed contents."""
        data = _as_list(dataset.get("config"))
        paths = [*data[:-1], *compose(data[-1], *_as_list(configs))] if data else _as_list(configs)
        loaded = [self._config(path, what) for path in paths]
        return [path for path, _ in loaded], [content for _, content in loaded]

    def score(self, cell: dict, configs: Any, dataset: dict) -> Stage:
        paths, contents = self._composed(dataset, configs, "score config")
        key = stable_hash({"score": contents, "data": dataset["args"]})
        return self._add(Stage("score", key, f"score ({cell['dataset']})", str(self.output / "score" / key), paths,
                               cli_args(dataset["args"]), self.cwd, checkpoint_every=_checkpoint_settings(contents)))

    def generator(self, cell: dict, source: dict, surrogate: dict, dataset: dict, generator_args: dict) -> Stage:
        paths, contents = self._composed(dataset, source["generator"],
                                         f"generator config of source {cell['source']!r}")
        overrides = {**dataset["args"], **generator_args, **surrogate.get("args", {}), **source["args"]}
        needs = []
        if source.get("score"):
            score = self.score(cell, source["score"], dataset)
            overrides["model.init_args.score_checkpoint"] = str(score.checkpoint)
            needs.append(score.key)
        elif _needs_score(contents) and "model.init_args.score_checkpoint" not in overrides:
            raise ValueError(f"grid: source {cell['source']!r}: {source['generator']} uses a score model; give the "
                             "source a `score:` config (the grid fits it once and passes its checkpoint)")
        overrides = _changes(overrides, contents)
        key = stable_hash({"generator": contents, "args": overrides})
        label = cell["source"] + (f"-{cell['surrogate']}" if cell["surrogate"] else "")
        return self._add(Stage("generator", key, f"noise {label} ({cell['dataset']})",
                               str(self.output / "noise" / key), paths, cli_args(overrides),
                               self.cwd, needs, _checkpoint_settings(contents)))

    def victim(self, cell: dict, dataset: dict, victim: dict, victim_args: dict, noise: Stage | None,
               clean_rest: bool = False) -> Stage:
        paths, contents = [], []
        for config in [*_as_list(dataset.get("config")), *_as_list(victim.get("config"))]:
            path, content = self._config(config, "config")
            paths.append(path)
            contents.append(content)
        if not paths:
            raise ValueError(f"grid: victim {cell['victim']!r} has no config")
        overrides = {**dataset["args"], **victim["args"], **victim_args,
                     "model.init_args.adv_radius": cell["adv_radius"], "data.defence": cell["defence"],
                     "seed_everything": cell["seed"]}
        if noise is not None:
            overrides["data.perturbation"] = str(noise.result)
            overrides["data.protected_fraction"] = cell["protected_fraction"]
        if clean_rest:
            overrides.update({"data.protected_fraction": cell["protected_fraction"], "data.drop_protected": True})
        overrides = _changes(overrides, contents)
        key = stable_hash({"configs": contents, "args": overrides, "noise": noise.key if noise else None})
        return self._add(Stage("victim", key, describe(cell), str(self.output / "cells" / key),
                               paths, cli_args(overrides), self.cwd, [noise.key] if noise else [],
                               _checkpoint_settings(contents), cell={k: cell[k] for k in AXES}))


def describe(cell: dict) -> str:
    """A cell in one line: ``rem (vgg16) -> resnet18 on cifar10, rho_a=4, seed 0``."""
    source = cell["source"] + (f" ({cell['surrogate']})" if cell.get("surrogate") else "")
    extra = [f"rho_a={cell['adv_radius']:g}"]
    if cell["defence"] != "none":
        extra.append(f"defence={cell['defence']}")
    if cell.get("protected_fraction") not in (None, 1, 1.0):
        extra.append(f"protected={cell['protected_fraction']:g}")
    return f"{source} -> {cell['victim']} on {cell['dataset']}, " + ", ".join(extra) + f", seed {cell['seed']}"


def load_grid(path: str | Path, cwd: str | None = None) -> Grid:
    """Parse a grid file and expand it into cells and stages (nothing runs)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"grid file {path} not found")
    raw = read_grid_file(path)
    cwd = os.path.abspath(cwd or os.getcwd())
    output = Path(os.path.abspath(os.path.join(cwd, raw.get("output") or f"runs/grids/{path.stem}")))
    planner = _Planner(output, cwd)
    cells: dict[str, dict] = {}
    order: dict[str, list] = {axis: [] for axis in AXES}
    for part in _parts(raw):
        axes = {axis: _normalise_entries(axis, part.get(key)) if axis in ("dataset", "source", "victim")
                else part.get(key) for key, axis in AXIS_KEYS.items()}
        axes["surrogate"] = _normalise_entries("surrogate", axes["surrogate"]) if axes["surrogate"] else {None: {}}
        for axis, default in (("adv_radius", [0]), ("defence", ["none"]), ("protected_fraction", [1.0]),
                              ("seed", [0])):
            axes[axis] = _as_list(axes[axis]) or default
        for axis in AXES:
            order[axis] += [v for v in axes[axis] if v not in order[axis]]
        for values in itertools.product(*(axes[a] for a in AXES)):
            cell = dict(zip(AXES, values))
            source = axes["source"][cell["source"]]
            if source.get("clean_rest"):  # the clean rest of each protected share: no surrogate, no cell at 100%
                if float(cell["protected_fraction"]) == 1.0:
                    continue
                cell["surrogate"] = None
            elif not source.get("generator"):  # clean data: one cell, whatever the surrogate and protected share
                cell.update({axis: None for axis in NOT_FOR_CLEAN})
            dataset = _fill(axes["dataset"][cell["dataset"]], cell)
            noise = None
            if source.get("generator"):
                noise = planner.generator(cell, _fill(source, cell), _fill(axes["surrogate"][cell["surrogate"]], cell),
                                          dataset, _fill(part.get("generator_args") or {}, cell))
            stage = planner.victim(cell, dataset, _fill(axes["victim"][cell["victim"]], cell),
                                   _fill(part.get("victim_args") or {}, cell), noise, bool(source.get("clean_rest")))
            cells.setdefault(stage.key, {**cell, "key": stage.key})
    kinds = {kind: i for i, kind in enumerate(STAGE_KINDS)}
    stages = dict(sorted(planner.stages.items(), key=lambda item: kinds[item[1].kind]))
    return Grid(path, str(raw.get("name") or path.stem), output, list(cells.values()), stages,
                {axis: [v for v in values if v is not None] for axis, values in order.items()},
                dict(raw.get("slurm") or {}))


def select(grid: Grid, only: list[str] | None) -> list[dict]:
    """The cells matching every ``AXIS=V1,V2`` filter (values compared as text; clean cells, which have no
    surrogate and no protected fraction, match any value of those)."""
    cells = grid.cells
    for condition in only or []:
        axis, sep, values = condition.partition("=")
        if not sep or axis not in AXES:
            raise ValueError(f"--only {condition!r}: expected AXIS=VALUE[,VALUE...] with AXIS one of {', '.join(AXES)}")
        wanted = values.split(",")
        cells = [c for c in cells if c[axis] is None or any(_same(c[axis], w) for w in wanted)]
    return cells


def _same(value: Any, text: str) -> bool:
    """A cell's value against a command-line one: ``1``, ``1.0`` and ``1.00`` are one radius."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            return float(text) == float(value)
        except ValueError:
            return False
    return str(value) == text


def stages_for(grid: Grid, cells: list[dict]) -> list[Stage]:
    """The stages the cells need (theirs and those they read), in run order."""
    wanted: set[str] = set()
    todo = [c["key"] for c in cells]
    while todo:
        key = todo.pop()
        if key not in wanted:
            wanted.add(key)
            todo += grid.stages[key].needs
    return [s for k, s in grid.stages.items() if k in wanted]
