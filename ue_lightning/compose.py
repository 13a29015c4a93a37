"""Composed configs: a data config, a method config and, where the data changes a method setting, an overlay.

A run is ``--config configs/data/D.yaml --config configs/<kind>/M.yaml`` (kind: ``generator`` or ``score``),
plus ``configs/<kind>/D/M.yaml`` when that overlay exists: it holds only the settings of method M that
dataset D (or its scale) changes. A config value may name the run with two placeholders, which the CLI fills
once the configs are merged:

- ``{data}``: the stem of the last ``--config`` whose folder is ``data`` (``cifar10``, ``cifar10-npz-cpu``);
- ``{method}``: the stem of the last ``--config`` below a ``generator`` or ``score`` folder (``em-samplewise``;
  an overlay such as ``cifar10-npz-cpu/rem-rho2.yaml`` names a variant, ``rem-rho2``).

So ``runs/generator/{method}-{data}`` stays distinct per method and dataset without anyone typing it, and a
path given literally (in a config or on the command line) is kept as it is.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from jsonargparse import Namespace

#: Folders whose configs name the method of a run.
METHOD_FOLDERS = ("generator", "score")


def overlay_for(method: str | Path, data: str | Path) -> Path:
    """The overlay of ``method`` for ``data``: ``<method's folder>/<data stem>/<method stem>.yaml`` (may not exist)."""
    method = Path(method)
    return method.parent / Path(data).stem / method.name


def compose(data: str | Path, *methods: str | Path) -> list[str]:
    """The configs of one run, in merge order: ``data``, then each of ``methods`` followed by its overlay for
    that data where there is one (collapse: ``rem.yaml, collapse.yaml``; a variant overlay comes last)."""
    out = [str(data)]
    for method in methods:
        overlay = overlay_for(method, data)
        out += [str(method), *([str(overlay)] if overlay.is_file() else [])]
    return out


def run_names(configs: list[Any]) -> dict[str, str]:
    """``{"data": ..., "method": ...}`` from the ``--config`` paths (a name no config gives is left out)."""
    names: dict[str, str] = {}
    for config in (Path(str(c)) for c in configs):
        if config.parent.name == "data":
            names["data"] = config.stem
        if any(folder in METHOD_FOLDERS for folder in config.parent.parts):
            names["method"] = config.stem
    return names


def missing_overlays(configs: list[Any]) -> list[str]:
    """Overlays that exist for a given method config and the given data config, but were not given."""
    paths = [Path(str(c)) for c in configs]
    data = [p for p in paths if p.parent.name == "data"]
    if not data:
        return []
    methods = [p for p in paths if p.parent.name in METHOD_FOLDERS]
    given = {p.resolve() for p in paths}
    return [str(o) for o in (overlay_for(m, data[-1]) for m in methods) if o.is_file() and o.resolve() not in given]


def fill_placeholders(value: Any, names: dict[str, str], where: str = "", missing: list[str] | None = None) -> Any:
    """``value`` (a Namespace, list, dict or str, walked in place) with ``{data}`` and ``{method}`` filled from
    ``names``; the dotted keys of values naming a placeholder that ``names`` lacks are appended to ``missing``."""
    if isinstance(value, str):
        for key in ("data", "method"):
            token = "{" + key + "}"
            if token in value:
                if key in names:
                    value = value.replace(token, names[key])
                elif missing is not None:
                    missing.append(where)
        return value
    if isinstance(value, Namespace):
        for key, item in vars(value).items():
            setattr(value, key, fill_placeholders(item, names, f"{where}.{key}" if where else key, missing))
        return value
    if isinstance(value, list):
        return [fill_placeholders(item, names, where, missing) for item in value]
    if isinstance(value, dict):
        return {key: fill_placeholders(item, names, f"{where}.{key}", missing) for key, item in value.items()}
    return value


def unnamed_error(missing: list[str]) -> ValueError:
    """The error for settings whose ``{data}``/``{method}`` no ``--config`` names, with both ways out."""
    return ValueError("these settings name the run by its configs' names ({data}: a --config in a folder "
                      "named data; {method}: one below a generator or score folder), and no --config gives "
                      f"the name: {', '.join(dict.fromkeys(missing))}. Put the config in such a folder, or give "
                      "these values literally, in a config of your own given last or as flags")
