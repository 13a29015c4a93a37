"""A grid's results as a Markdown table, a CSV file and a picture (grouped bars with error bars over seeds).

Rows are the noise sources (with the surrogate, when the grid varies it); columns are the
other axes the grid varies (dataset, victim, adversarial radius, defence, protected
fraction); seeds are averaged: mean ± standard deviation (n). A clean cell has no surrogate
and no protected fraction, so the clean row shows its value in every such column. A grid with a
``paper:`` block shows the paper's number beside ours in each cell ("ours / paper"), in the CSV
(``paper_test_acc``) and as a black tick on each bar. A ``held_out:`` grid shows held-out accuracy
(``held_out_acc``) where the others show test accuracy.
"""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

from ue_lightning.grid.spec import Grid

COLUMN_AXES = ("dataset", "victim", "adv_radius", "defence", "protected_fraction")
SHORT = {"adv_radius": "rho_a", "protected_fraction": "protected"}
METRICS = {"test_acc": "clean test accuracy", "train_acc": "train accuracy (last epoch, on the data it trained on)"}
#: What a ``held_out:`` grid scores its victims by in place of ``test_acc``.
HELD_OUT = "held-out accuracy (clean train images the victim never trained on; the test split is never read)"


def metrics(grid: Grid) -> dict[str, str]:
    """The grid's result keys and their titles: its score (``test_acc`` or ``held_out_acc``) first, then
    ``train_acc``."""
    return METRICS if grid.score_metric == "test_acc" else {"held_out_acc": HELD_OUT, "train_acc": METRICS["train_acc"]}


def collect(grid: Grid) -> list[dict]:
    """The metrics of the grid's finished cells, with this grid's names for their coordinates (another grid
    sharing the output folder may have made a cell under its own names); other cells in the folder are ignored."""
    results = []
    for cell in grid.cells:
        path = grid.victim(cell).result
        if path.exists():
            results.append({**json.loads(path.read_text()), **cell})
    return results


def _value(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def row_label(cell: dict) -> str:
    return cell["source"] + (f" ({cell['surrogate']})" if cell.get("surrogate") else "")


def layout(grid: Grid) -> tuple[list[str], list[str], list[tuple]]:
    """Row labels, column axes and column values (tuples over those axes), in the grid file's order."""
    rows = []
    for source in grid.order["source"]:
        for cell in grid.cells:
            if cell["source"] == source and row_label(cell) not in rows:
                rows.append(row_label(cell))
    axes = [a for a in COLUMN_AXES if len(grid.order[a]) > 1]
    columns: list[tuple] = [()]
    for axis in axes:
        columns = [(*c, v) for c in columns for v in grid.order[axis]]
    present = {tuple(cell[a] for a in axes) for cell in grid.cells if None not in (cell[a] for a in axes)}
    return rows, axes, [c for c in columns if c in present]


def column_label(axes: list[str], column: tuple) -> str:
    return ", ".join(f"{SHORT.get(a, a)}={_value(v)}" for a, v in zip(axes, column)) or "all"


def _matches(result: dict, axes: list[str], column: tuple) -> bool:
    return all(result[a] is None or result[a] == v for a, v in zip(axes, column))


def summary(values: list[float]) -> tuple[float, float, int]:
    """Mean, sample standard deviation (0 for one value) and count."""
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0, len(values)


def aggregate(grid: Grid, results: list[dict], metric: str) -> dict[tuple[str, tuple], tuple[float, float, int]]:
    """``{(row, column): (mean, std, n)}`` over seeds, in [0, 1]."""
    rows, axes, columns = layout(grid)
    out = {}
    for row in rows:
        for column in columns:
            values = [r[metric] for r in results if row_label(r) == row and _matches(r, axes, column)
                      and r.get(metric) is not None]
            if values:
                out[row, column] = summary(values)
    return out


def paper_numbers(grid: Grid) -> dict[tuple[str, tuple], str]:
    """``{(row, column): the paper's number(s) as printed}`` for the table's places that have one."""
    if grid.paper is None:
        return {}
    rows, axes, columns = layout(grid)
    out = {}
    for row in rows:
        for column in columns:
            found = [grid.paper.value(c) for c in grid.cells if row_label(c) == row and _matches(c, axes, column)]
            numbers = list(dict.fromkeys(f"{v:.2f}" for v in found if v is not None))
            if numbers:
                out[row, column] = ", ".join(numbers)
    return out


def _cell_text(stats: tuple[float, float, int] | None) -> str:
    if stats is None:
        return "-"
    mean, std, n = stats
    return f"{100 * mean:.1f} ± {100 * std:.1f} ({n})" if n > 1 else f"{100 * mean:.1f} (1)"


def markdown(grid: Grid, results: list[dict]) -> str:
    rows, axes, columns = layout(grid)
    paper = paper_numbers(grid)
    scored = ("tested on clean test images" if grid.score_metric == "test_acc" else
              f"scored on a held-out {100 * grid.held_out:.1f}% of their train images, clean (the test split is "
              "never read)")
    lines = [f"# {grid.name}", "", f"{len(results)} of {len(grid.cells)} cells done. Accuracy in %, mean ± std over "
             f"seeds (n seeds); the victims are {scored}."]
    if grid.paper is not None:
        lines.append(f"Clean test accuracy: ours / {grid.paper.title} (the paper's number, as printed).")
    lines.append("")
    for metric, title in metrics(grid).items():
        stats = aggregate(grid, results, metric)
        beside = paper if metric == "test_acc" else {}
        lines += [f"## {title}", "", "| noise source | " + " | ".join(column_label(axes, c) for c in columns) + " |",
                  "|---|" + "---|" * len(columns)]
        for row in rows:
            texts = [_cell_text(stats.get((row, c))) + (f" / {beside[row, c]}" if (row, c) in beside else "")
                     for c in columns]
            lines.append(f"| {row} | " + " | ".join(texts) + " |")
        lines.append("")
    return "\n".join(lines)


def write_csv(grid: Grid, results: list[dict], path: Path) -> None:
    """One line per (row, column) with results (or a paper number): the axes' values, n and the mean and std of
    each metric, in [0, 1]; with a ``paper:`` block, the paper's number too (``paper_test_acc``, in [0, 1])."""
    rows, axes, columns = layout(grid)
    names = metrics(grid)
    stats = {metric: aggregate(grid, results, metric) for metric in names}
    paper = {place: float(text.split(",")[0]) / 100 for place, text in paper_numbers(grid).items()}
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["noise_source", *axes, "n", *(f"{m}_{s}" for m in names for s in ("mean", "std")),
                         *(["paper_test_acc"] if grid.paper is not None else [])])
        for row in rows:
            for column in columns:
                if (row, column) not in stats[grid.score_metric] and (row, column) not in paper:
                    continue
                cells = [stats[m].get((row, column)) for m in names]
                numbers = [f"{x:.4f}" if c else "" for c in cells for x in (c or (0, 0))[:2]]
                extra = [] if grid.paper is None else [f"{paper[row, column]:.4f}" if (row, column) in paper else ""]
                writer.writerow([row, *map(_value, column), cells[0][2] if cells[0] else 0, *numbers, *extra])


def plot(grid: Grid, results: list[dict], path: Path) -> None:
    """Grouped bars: a group per noise source, a bar per column, error bars = std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, axes, columns = layout(grid)
    stats = aggregate(grid, results, grid.score_metric)
    paper = {place: float(text.split(",")[0]) for place, text in paper_numbers(grid).items()}
    width = 0.8 / max(1, len(columns))
    ticked = False
    fig, ax = plt.subplots(figsize=(max(6.0, 0.35 * len(rows) * len(columns) + 2), 4.5))
    for j, column in enumerate(columns):
        xs = [i + (j - (len(columns) - 1) / 2) * width for i, row in enumerate(rows) if (row, column) in stats]
        cells = [stats[row, column] for row in rows if (row, column) in stats]
        ax.bar(xs, [100 * c[0] for c in cells], width, yerr=[100 * c[1] for c in cells], capsize=3,
               label=column_label(axes, column))
        ticks = [(i + (j - (len(columns) - 1) / 2) * width, paper[row, column]) for i, row in enumerate(rows)
                 if (row, column) in paper]
        if ticks:  # the paper's numbers, one legend entry for them all
            ax.scatter(*zip(*ticks), marker="_", s=300 * width, color="black", zorder=3,
                       label=None if ticked else grid.paper.title)
            ticked = True
    tilt = len(rows) > 4
    ax.set_xticks(range(len(rows)), rows, rotation=20 if tilt else 0, ha="right" if tilt else "center")
    what = "clean test accuracy" if grid.score_metric == "test_acc" else "held-out accuracy"
    ax.set_ylabel(f"{what} (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"{grid.name}\nvictims' {what}, mean ± std over seeds", fontsize="medium")
    if len(columns) > 1 or paper:
        ax.legend(fontsize="small", ncols=min(4, len(columns)))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def render(grid: Grid) -> dict[str, Path]:
    """Write ``<name>.md``, ``<name>.csv`` and ``<name>.png`` in the grid's output folder (grids may share
    one, and so their noise files and cells); return their paths."""
    results = collect(grid)
    grid.output.mkdir(parents=True, exist_ok=True)
    paths = {kind: grid.output / f"{grid.name}.{suffix}" for kind, suffix in
             (("markdown", "md"), ("csv", "csv"), ("picture", "png"))}
    paths["markdown"].write_text(markdown(grid, results))
    write_csv(grid, results, paths["csv"])
    plot(grid, results, paths["picture"])
    return paths
