"""``ue grid``: run a table of experiments described in YAML, resumably, here or on SLURM, and render it.

    ue grid run grids/cpu-table1.yaml --jobs 2         # every cell not done yet, 2 processes at once
    ue grid run grids/table1.yaml --executor slurm     # one SLURM job a stage (submitit)
    ue grid run grids/cpu-table1.yaml --only source=clean,rem --only seed=0
    ue grid table grids/cpu-table1.yaml                # <output>/cpu-table1.{md,csv,png} from the finished cells
    ue grid status grids/cpu-table1.yaml               # every cell, done or not, and its folder

The format of a grid file is in docs/grids.md and in
``ue_lightning/grid/spec.py``; the grids of the papers' tables are in ``grids/``.
"""

from __future__ import annotations

import argparse
import json
import sys

from ue_lightning.console import OneLineArgumentParser
from ue_lightning.grid.spec import AXES, Grid, Stage, describe, load_grid, select, stages_for

__all__ = ["Grid", "Stage", "load_grid", "main", "run_grid"]


def run_grid(path: str, jobs: int = 1, executor: str = "local", only: list[str] | None = None) -> Grid:
    """Run (or submit) every cell of the grid file not done yet; render the table when they ran here."""
    from ue_lightning.grid.execute import run_local, submit_slurm

    grid = load_grid(path)
    cells = select(grid, only)
    stages = stages_for(grid, cells)
    done = sum(grid.victim(c).done() for c in cells)
    print(f"{grid.name}: {len(cells)} cells ({done} done), {sum(not s.done() for s in stages)} stages to run; "
          f"output in {grid.output}", flush=True)
    grid.output.mkdir(parents=True, exist_ok=True)
    (grid.output / f"{grid.name}.cells.json").write_text(json.dumps(
        [{**c, "folder": grid.victim(c).folder} for c in grid.cells], indent=1))
    if executor == "slurm":
        jobs_by_stage = submit_slurm(stages, grid.slurm, grid.output / "slurm")
        (grid.output / "slurm").mkdir(parents=True, exist_ok=True)
        (grid.output / "slurm" / f"{grid.name}.jobs.json").write_text(json.dumps(
            {k: {"stage": grid.stages[k].name, "job": j} for k, j in jobs_by_stage.items()}, indent=1))
        print(f"{len(jobs_by_stage)} jobs submitted; `ue grid table {path}` renders what has finished "
              "(run `ue grid run` again only once they have ended: a stage still running would be submitted twice)")
        return grid
    if executor != "local":
        raise ValueError(f"--executor {executor}: expected local or slurm")
    failed = run_local(stages, jobs)
    show_table(grid)
    if failed:
        print(f"{len(failed)} stage(s) failed (their log.txt says why); run the same command again to retry them "
              "(the others are kept):\n" + "\n".join(f"  {s.name}: {s.folder}" for s in failed), file=sys.stderr)
        sys.exit(1)
    return grid


def show_table(grid: Grid) -> None:
    """Render the grid's table files and print the Markdown."""
    from ue_lightning.grid.render import render

    paths = render(grid)
    print(paths["markdown"].read_text())
    print("written: " + ", ".join(str(p) for p in paths.values()))


def main(argv: list[str]) -> None:
    parser = OneLineArgumentParser(prog="ue grid", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.split("\n\n")[1].splitlines()))
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run (or submit) every cell not done yet, then render the table")
    table = commands.add_parser("table", help="render <output>/<name>.md, .csv and .png from the finished cells")
    status = commands.add_parser("status", help="list the cells, done or not, with their folders")
    for sub in (run, table, status):
        sub.add_argument("grid", help="a grid file, e.g. grids/cpu-table1.yaml")
    for sub in (run, status):
        sub.add_argument("--only", action="append", metavar="AXIS=V1,V2",
                         help=f"keep the cells with these values (repeatable); AXIS: {', '.join(AXES)}")
    run.add_argument("--jobs", type=int, default=1, help="stages at once, here (each with cores/jobs torch threads)")
    run.add_argument("--executor", choices=("local", "slurm"), default="local",
                     help="local: here; slurm: one job a stage through submitit (the grid's `slurm:` resources)")
    args = parser.parse_args(argv)
    if args.command == "run" and args.jobs < 1:
        parser.error(f"--jobs must be at least 1 (stages at once), got {args.jobs}")
    if args.command == "run":
        run_grid(args.grid, args.jobs, args.executor, args.only)
    elif args.command == "table":
        show_table(load_grid(args.grid))
    else:
        grid = load_grid(args.grid)
        for cell in select(grid, args.only):
            stage = grid.victim(cell)
            print(f"{'done   ' if stage.done() else 'pending'} {describe(cell)}  {stage.folder}")
