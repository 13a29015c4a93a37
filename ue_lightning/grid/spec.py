"""A grid file: its YAML format, and its expansion into cells and the stages that make them.

A cell is one victim: (dataset, noise source, surrogate, victim, adversarial radius, defence,
protected fraction, seed). The stages behind it are the score model (data collapse only),
the noise generator (fit + predict, one noise file) and the victim (fit + test, or in a ``held_out:`` grid fit
+ validate on its held-out train images). Every stage
is named by a hash of its resolved settings (the parsed YAML of its configs, the overrides
that change them and the stages it reads) and lives in ``<output>/{score,noise,cells}/<hash>``:
a generator that reads a clean classifier (TAP: a source's ``classifier:``, a victim of the grid) reads
that victim stage's checkpoint, and shares the stage with the grid's clean cell of that victim;
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
from fractions import Fraction
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
TOP_KEYS = {"name", "output", *AXIS_KEYS, *ARG_KEYS, "parts", "slurm", "paper", "held_out"}
#: Keys of a grid's ``paper:`` block: the published numbers of the table the grid reproduces.
PAPER_KEYS = {"title", "rows", "columns", "values"}
#: Generator settings that read another stage's checkpoint: the source key that names that stage, and the fix.
INPUTS = {"model.init_args.score_checkpoint": ("score", "a `score:` config (the grid fits it once and passes "
                                                        "its checkpoint)"),
          "model.init_args.classifier_checkpoint": ("classifier", "a `classifier:`, the name of one of the grid's "
                                                                  "victims (trained on the clean data at rho_a 0, "
                                                                  "seed 0; the grid passes its checkpoint)")}
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
    scored_on: str = "test"  # victims: "test" (the test split) or "held_out" (held-out train images, ``held_out:``)

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

    paper: PaperTable | None = None  # the published numbers of the table the grid reproduces
    held_out: float | None = None  # share of each victim's train images it is scored on instead of the test split

    @property
    def score_metric(self) -> str:
        """The result key a victim is scored by: ``test_acc``, or ``held_out_acc`` in a ``held_out:`` grid."""
        return "held_out_acc" if self.held_out else "test_acc"

    def victim(self, cell: dict) -> Stage:
        return self.stages[cell["key"]]


@dataclass
class PaperTable:
    """A grid's ``paper:`` block: the published accuracy (%) of its cells, each keyed by some of their axes."""

    title: str
    entries: list[tuple[dict, float]]  # ({axis: value}, accuracy in % as printed)

    def value(self, cell: dict) -> float | None:
        """The paper's number for a cell (coordinates as in ``Grid.cells``), or None."""
        found = [number for coords, number in self.entries if _covers(coords, cell)]
        return found[0] if found else None


def _covers(coords: dict, cell: dict) -> bool:
    return all(_same(cell[axis], str(value)) for axis, value in coords.items())


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
        allowed = {"source": {"generator", "score", "classifier", "args", "clean_rest"},
                   "surrogate": {"args"}}.get(axis, {"config", "args"})
        if set(spec) - allowed:
            raise ValueError(f"grid: {axis} {name!r}: unknown keys {sorted(set(spec) - allowed)} "
                             f"(allowed: {sorted(allowed)})")
        for needed in ("score", "classifier"):
            if axis == "source" and needed in spec and "generator" not in spec:
                raise ValueError(f"grid: source {name!r} has a {needed} but no generator")
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


def setting(stage: Stage, dotted: str, default: Any = None) -> Any:
    """The value a stage's overrides, or else its configs (the last that sets it), give a dotted key, or ``default``
    when none does; an override is read as YAML, as the command line reads it."""
    args = dict(zip(stage.args[::2], stage.args[1::2]))
    if f"--{dotted}" in args:
        return yaml.safe_load(args[f"--{dotted}"])
    value = _lookup([_load_yaml(path, "config") for path in stage.configs], dotted)
    return default if value is _MISSING else value


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


def held_out_share(raw: Any, path: Path) -> float | None:
    """A grid's ``held_out:``: None, or a share in (0, 1) written as a number or a ratio (``197/1347``)."""
    if raw is None:
        return None
    try:
        share = -1.0 if isinstance(raw, bool) else float(Fraction(str(raw).replace(" ", "")))
    except (ValueError, ZeroDivisionError):  # not a number, or a ratio over 0
        share = -1.0
    if not 0.0 < share < 1.0:
        raise ValueError(f"grid: {path}: held_out {raw!r} must be a share of the victims' train images in (0, 1), "
                         "a number or a ratio such as 197/1347 (or leave it out to score on the test split)")
    return share


def grid_name(name: Any, path: Path) -> str:
    """The grid's ``name:`` (default: the file's name without ``.yaml``), a plain file name: the tables are
    written as ``<output>/<name>.md`` (and ``.csv``, ``.png``, ``.cells.json``), inside the output folder."""
    name = str(name if name not in (None, "") else path.stem)
    if os.path.isabs(name) or ".." in name or any(sep in name for sep in ("/", "\\", os.sep, "\0")):
        raise ValueError(f"grid: {path}: name {name!r} is not a plain file name (its tables are written as "
                         "<output>/<name>.md, .csv and .png): drop the folders, '/', '\\' and '..' from it")
    return name


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

    def __init__(self, output: Path, cwd: str, held_out: float | None = None):
        self.output, self.cwd, self.held_out = output, cwd, held_out
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
        (``ue_lightning.compose``), as paths and parsed contents. An overlay the list also names right after
        (``[rem.yaml, cifar10-npz-cpu/rem.yaml]``, which other data needs spelt out) is merged once."""
        data = _as_list(dataset.get("config"))
        paths = [*data[:-1], *compose(data[-1], *_as_list(configs))] if data else _as_list(configs)
        paths = [p for i, p in enumerate(paths) if i == 0 or os.path.abspath(p) != os.path.abspath(paths[i - 1])]
        loaded = [self._config(path, what) for path in paths]
        return [path for path, _ in loaded], [content for _, content in loaded]

    def score(self, cell: dict, configs: Any, dataset: dict) -> Stage:
        paths, contents = self._composed(dataset, configs, "score config")
        key = stable_hash({"score": contents, "data": dataset["args"]})
        return self._add(Stage("score", key, f"score ({cell['dataset']})", str(self.output / "score" / key), paths,
                               cli_args(dataset["args"]), self.cwd, checkpoint_every=_checkpoint_settings(contents)))

    def classifier(self, cell: dict, name: str, victims: dict, dataset: dict, victim_args: dict,
                   surrogate: dict) -> Stage:
        """The clean classifier a generator reads (TAP): the victim ``name`` trained on the clean data at rho_a 0,
        no defence, seed 0, with the surrogate's settings (its architecture) and the grid's top-level
        ``victim_args``: the same stage as the grid's clean cell of that victim, when the grid has it."""
        if name not in victims:
            raise ValueError(f"grid: source {cell['source']!r}: classifier {name!r} is not among the victims "
                             f"{list(victims)}")
        label = name if not surrogate.get("args") else f"{name} ({cell['surrogate']})"
        clean = {**cell, "source": "clean", "surrogate": None, "victim": label, "adv_radius": 0, "defence": "none",
                 "protected_fraction": None, "seed": 0}
        victim = victims[name]
        return self.victim(clean, dataset, {**victim, "args": {**victim["args"], **surrogate.get("args", {})}},
                           victim_args, None)

    def generator(self, cell: dict, source: dict, surrogate: dict, dataset: dict, generator_args: dict,
                  classifier: Stage | None = None) -> Stage:
        """The noise stage of a cell; its score model is planned here, its classifier (if any) by the caller, which
        gives the classifier the surrogate's settings instead of the generator."""
        paths, contents = self._composed(dataset, source["generator"],
                                         f"generator config of source {cell['source']!r}")
        surrogate_args = {} if classifier else surrogate.get("args", {})
        overrides = {**dataset["args"], **generator_args, **surrogate_args, **source["args"]}
        needs = []
        inputs = {"model.init_args.score_checkpoint": self.score(cell, source["score"], dataset)
                  if source.get("score") else None, "model.init_args.classifier_checkpoint": classifier}
        for key, stage in inputs.items():
            if stage is not None:
                overrides[key] = str(stage.checkpoint)
                needs.append(stage.key)
            elif _lookup(contents, key) is not _MISSING and key not in overrides:
                raise ValueError(f"grid: source {cell['source']!r}: {source['generator']} reads a "
                                 f"{INPUTS[key][0]}; give the source {INPUTS[key][1]}")
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
        if self.held_out:  # the victim alone holds them out; its generator and score model see the dataset's all
            overrides["data.val_fraction"] = self.held_out
        overrides = _changes(overrides, contents)
        key = stable_hash({"configs": contents, "args": overrides, "noise": noise.key if noise else None})
        return self._add(Stage("victim", key, describe(cell), str(self.output / "cells" / key),
                               paths, cli_args(overrides), self.cwd, [noise.key] if noise else [],
                               _checkpoint_settings(contents), cell={k: cell[k] for k in AXES},
                               scored_on="held_out" if self.held_out else "test"))


def describe(cell: dict) -> str:
    """A cell in one line: ``rem (vgg16) -> resnet18 on cifar10, rho_a=4, seed 0``."""
    source = cell["source"] + (f" ({cell['surrogate']})" if cell.get("surrogate") else "")
    extra = [f"rho_a={cell['adv_radius']:g}"]
    if cell["defence"] != "none":
        extra.append(f"defence={cell['defence']}")
    if cell.get("protected_fraction") not in (None, 1, 1.0):
        extra.append(f"protected={cell['protected_fraction']:g}")
    return f"{source} -> {cell['victim']} on {cell['dataset']}, " + ", ".join(extra) + f", seed {cell['seed']}"


def _run_order(stages: dict[str, Stage]) -> dict[str, Stage]:
    """Score models, generators, victims, except that a stage comes after every stage it reads (a TAP generator
    after its clean classifier), so a submission in this order always knows the jobs a stage waits for."""
    kinds = {kind: i for i, kind in enumerate(STAGE_KINDS)}
    ordered: dict[str, Stage] = {}

    def visit(stage: Stage) -> None:
        if stage.key not in ordered:
            for key in stage.needs:
                visit(stages[key])
            ordered[stage.key] = stage

    for stage in sorted(stages.values(), key=lambda s: kinds[s.kind]):
        visit(stage)
    return ordered


def _paper_table(raw: Any, path: Path, order: dict[str, list], cells: list[dict]) -> PaperTable | None:
    """Parse and check a grid's ``paper:`` block::

        paper:
          title: Fang et al., Table 1
          rows: [dataset, adv_radius]                        # the axes each line of `values` starts with
          columns: {source: [clean, em-samplewise, rem]}     # then one number a value of this axis
          values:
            - [cifar10, 0, 94.66, 13.20, 22.93]

    Every value it names must be one of the grid's, every number must belong to a cell of the grid, and no cell
    may have two numbers."""
    if raw is None:
        return None
    where = f"grid: {path}: paper"
    if not isinstance(raw, dict) or set(raw) != PAPER_KEYS:
        raise ValueError(f"{where}: expected a mapping with the keys {sorted(PAPER_KEYS)}, got {raw!r}")
    rows, columns, lines = raw["rows"], raw["columns"], raw["values"]
    if not isinstance(rows, list) or not set(rows) <= set(AXES):
        raise ValueError(f"{where}: rows must be a list of axes among {AXES}, got {rows!r}")
    if not isinstance(columns, dict) or len(columns) != 1 or not set(columns) <= set(AXES) - set(rows) \
            or not isinstance(next(iter(columns.values())), list):
        raise ValueError(f"{where}: columns must be one axis (not among the rows) -> a list of its values, "
                         f"got {columns!r}")
    (column_axis, names), = columns.items()
    entries: list[tuple[dict, float]] = []
    for line in lines if isinstance(lines, list) else [lines]:
        if not isinstance(line, list) or len(line) != len(rows) + len(names):
            raise ValueError(f"{where}: each line of values is {len(rows)} row value(s) then {len(names)} numbers, "
                             f"got {line!r}")
        for name, number in zip(names, line[len(rows):]):
            coords = {**dict(zip(rows, line[:len(rows)])), column_axis: name}
            if isinstance(number, bool) or not isinstance(number, (int, float)):
                raise ValueError(f"{where}: {coords}: {number!r} is not a number")
            for axis, value in coords.items():
                if not any(_same(known, str(value)) for known in order[axis]):
                    raise ValueError(f"{where}: {axis} {value!r} is not one of the grid's ({order[axis]})")
            if not any(_covers(coords, cell) for cell in cells):
                raise ValueError(f"{where}: no cell of the grid has {coords}")
            entries.append((coords, float(number)))
    for cell in cells:
        if sum(_covers(coords, cell) for coords, _ in entries) > 1:
            raise ValueError(f"{where}: {describe(cell)} has more than one number")
    return PaperTable(str(raw["title"]), entries)


def load_grid(path: str | Path, cwd: str | None = None) -> Grid:
    """Parse a grid file and expand it into cells and stages (nothing runs)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"grid file {path} not found")
    raw = read_grid_file(path)
    cwd = os.path.abspath(cwd or os.getcwd())
    output = Path(os.path.abspath(os.path.join(cwd, raw.get("output") or f"runs/grids/{path.stem}")))
    held_out = held_out_share(raw.get("held_out"), path)
    if held_out and raw.get("paper") is not None:
        raise ValueError(f"grid: {path}: a `paper:` block holds test accuracies and a `held_out:` grid never reads "
                         "the test split: drop one of them")
    planner = _Planner(output, cwd, held_out)
    victims = _normalise_entries("victim", raw["victims"]) if isinstance(raw["victims"], dict) else {}
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
            noise = classifier = None
            surrogate = _fill(axes["surrogate"].get(cell["surrogate"], {}), cell)
            if source.get("classifier"):
                classifier = planner.classifier(cell, str(source["classifier"]), {**victims, **axes["victim"]},
                                                dataset, _fill(raw.get("victim_args") or {}, cell), surrogate)
            if source.get("generator"):
                noise = planner.generator(cell, _fill(source, cell), surrogate, dataset,
                                          _fill(part.get("generator_args") or {}, cell), classifier)
            stage = planner.victim(cell, dataset, _fill(axes["victim"][cell["victim"]], cell),
                                   _fill(part.get("victim_args") or {}, cell), noise, bool(source.get("clean_rest")))
            cells.setdefault(stage.key, {**cell, "key": stage.key})
    order = {axis: [v for v in values if v is not None] for axis, values in order.items()}
    return Grid(path, grid_name(raw.get("name"), path), output, list(cells.values()), _run_order(planner.stages),
                order, dict(raw.get("slurm") or {}), _paper_table(raw.get("paper"), path, order, list(cells.values())),
                held_out)


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
