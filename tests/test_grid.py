"""`ue grid`: a grid file expands into cells, runs them resumably, renders the table, and submits to SLURM.

The end-to-end test runs two tiny cells (clean and uniform-noise data, a width-4 ResNet-18 for
one epoch on a fake .npz); the SLURM test checks the calls submitit would receive (there is no
cluster here); every shipped grid in grids/ is expanded without running it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from unittest.mock import MagicMock

import pytest
import yaml
from PIL import Image

from conftest import REPO, run_ue
from ue_lightning.grid import load_grid, run_grid
from ue_lightning.grid.execute import run_local
from ue_lightning.grid.render import markdown, render
from ue_lightning.grid.spec import select, stages_for
from ue_lightning.models import ARCHITECTURES

TINY_VICTIM = {"config": str(REPO / "configs/victim/resnet18-cpu.yaml"),
               "args": {"model.init_args.width": 4, "trainer.max_epochs": 1}}


def _npz_dataset(npz: Path) -> dict:
    return {"config": str(REPO / "configs/data/cifar10-npz-cpu.yaml"),
            "args": {"data.root": str(npz), "data.train_subset": None, "data.batch_size": 32}}


def _write(path: Path, grid: dict) -> Path:
    path.write_text(yaml.safe_dump(grid, sort_keys=False))
    return path


def test_two_cells_run_resume_and_render(tmp_path, fake_npz, capsys):
    grid_file = _write(tmp_path / "tiny.yaml", {
        "output": str(tmp_path / "out"),
        "datasets": {"fake": _npz_dataset(fake_npz)},
        "sources": {"clean": None, "random": str(REPO / "configs/generator/random.yaml")},
        "victims": {"r18w4": TINY_VICTIM}})
    run_grid(str(grid_file))
    grid = load_grid(grid_file)
    assert [c["source"] for c in grid.cells] == ["clean", "random"]
    clean, protected = (grid.victim(c) for c in grid.cells)
    for stage in (clean, protected):
        folder = Path(stage.folder)
        assert {"config.yaml", "metrics.json", "fit.json"} <= {p.name for p in folder.iterdir()}
        assert stage.checkpoint.is_file()
        resolved = yaml.safe_load((folder / "config.yaml").read_text())
        assert resolved["model"]["init_args"]["width"] == 4 and resolved["trainer"]["max_epochs"] == 1
    noise = Path(grid.stages[protected.needs[0]].result)
    assert yaml.safe_load((Path(protected.folder) / "config.yaml").read_text())["data"]["perturbation"] == str(noise)
    metrics = {s.cell["source"]: json.loads(s.result.read_text()) for s in (clean, protected)}
    assert metrics["random"]["protected_fraction"] == 1.0 and metrics["clean"]["protected_fraction"] is None
    assert all(0 <= m["test_acc"] <= 1 and 0 <= m["train_acc"] <= 1 for m in metrics.values())

    # a crash lost the protected cell: the rerun makes it again and touches neither the clean cell nor the noise
    before = {p: p.stat().st_mtime_ns for p in (clean.result, clean.checkpoint, noise)}
    for path in Path(protected.folder).rglob("*"):
        if path.is_file():
            path.unlink()
    capsys.readouterr()
    proc = run_ue("grid", "run", str(grid_file), "--jobs", "2", env={"OMP_NUM_THREADS": "1"})
    assert "2 cells (1 done), 1 stages to run" in proc.stdout
    assert proc.stdout.count("start ") == 1 and "start random -> r18w4 on fake" in proc.stdout
    assert {p: p.stat().st_mtime_ns for p in before} == before
    assert protected.result.is_file()

    md = (tmp_path / "out" / "tiny.md").read_text()
    results = [json.loads(s.result.read_text()) for s in (clean, protected)]
    expected = [f"| {r['source']} | {100 * r['test_acc']:.1f} (1) |" for r in results]
    assert "2 of 2 cells done" in md and "| noise source | all |" in md and all(line in md for line in expected)
    assert md in proc.stdout
    csv_lines = (tmp_path / "out" / "tiny.csv").read_text().splitlines()
    assert csv_lines[0] == "noise_source,n,test_acc_mean,test_acc_std,train_acc_mean,train_acc_std"
    assert [line.split(",")[:3] for line in csv_lines[1:]] == [
        [r["source"], "1", f"{r['test_acc']:.4f}"] for r in results]
    with Image.open(tmp_path / "out" / "tiny.png") as picture:
        assert picture.format == "PNG" and picture.width > 300


def test_a_held_out_grid_scores_each_victim_on_held_out_train_images_and_never_reads_the_test_split(
        tmp_path, fake_npz, monkeypatch):
    """``held_out: 1/3``: the victims (not the generator) hold out a stratified third of their train images and are
    scored on them, clean; the test split is never served; the table says so."""
    from ue_lightning.data import UEDataModule

    def no_test(self):
        raise AssertionError("a held_out grid read the test split")

    monkeypatch.setattr(UEDataModule, "test_dataloader", no_test)
    grid_file = _write(tmp_path / "held.yaml", {
        "output": str(tmp_path / "out"), "held_out": "1/3",
        "datasets": {"fake": _npz_dataset(fake_npz)},
        "sources": {"clean": None, "random": str(REPO / "configs/generator/random.yaml")},
        "victims": {"r18w4": TINY_VICTIM}})
    run_grid(str(grid_file))
    grid = load_grid(grid_file)
    assert grid.held_out == pytest.approx(1 / 3) and grid.score_metric == "held_out_acc"
    generator = next(s for s in grid.stages.values() if s.kind == "generator")
    assert "--data.val_fraction" not in generator.args  # the noise covers every train image
    for cell in grid.cells:
        stage = grid.victim(cell)
        resolved = yaml.safe_load((Path(stage.folder) / "config.yaml").read_text())
        assert resolved["data"]["val_fraction"] == pytest.approx(1 / 3)
        result = json.loads(stage.result.read_text())
        assert 0 <= result["held_out_acc"] <= 1 and "test_acc" not in result
    md = (tmp_path / "out" / "held.md").read_text()
    assert "held-out 33.3% of their train images" in md and "## held-out accuracy" in md and "test images" not in md
    assert (tmp_path / "out" / "held.csv").read_text().startswith("noise_source,n,held_out_acc_mean,")


@pytest.mark.parametrize("share", [0, 1, 1.5, "-0.1", "a/b", "1/0", True])
def test_a_held_out_share_outside_zero_one_is_refused_with_the_fix(share, tmp_path):
    base = {"datasets": {"d": str(REPO / "configs/data/digits.yaml")}, "sources": {"clean": None},
            "victims": {"v": str(REPO / "configs/victim/digits.yaml")}}
    with pytest.raises(ValueError, match=r"held_out .* must be a share .* in \(0, 1\)"):
        load_grid(_write(tmp_path / "g.yaml", {**base, "held_out": share}))


def test_a_held_out_grid_with_the_papers_test_numbers_is_refused(tmp_path):
    grid = {"datasets": {"d": str(REPO / "configs/data/digits.yaml")}, "sources": {"clean": None},
            "victims": {"v": str(REPO / "configs/victim/digits.yaml")}, "held_out": 0.1,
            "paper": {"title": "T", "rows": ["dataset"], "columns": {"source": ["clean"]}, "values": [["d", 90.0]]}}
    with pytest.raises(ValueError, match="drop one of them"):
        load_grid(_write(tmp_path / "g.yaml", grid))
    del grid["held_out"]
    assert load_grid(_write(tmp_path / "g.yaml", grid)).paper is not None  # the same block is fine on test scores


def _fake_grid(tmp_path: Path) -> Path:
    """A grid of real configs (never run here): clean and two generators, one with a score model."""
    return _write(tmp_path / "g.yaml", {
        "name": "g", "output": str(tmp_path / "out"),
        "datasets": {"digits": {"config": str(REPO / "configs/data/digits.yaml"), "args": {"data.resize": 16}}},
        "sources": {"clean": None,
                    "em": str(REPO / "configs/generator/em-classwise.yaml"),
                    "collapse": {"generator": [str(REPO / f"configs/generator/{m}.yaml") for m in ("rem", "collapse")],
                                 "score": str(REPO / "configs/score/dsm.yaml")}},
        "surrogates": ["resnet18", "vgg16"],
        "victims": {"r18": str(REPO / "configs/victim/digits.yaml")},
        "adv_radii": [0, 8], "protected_fractions": [0.5, 1.0], "seeds": [0, 1],
        "parts": [{}, {"sources": ["clean"], "seeds": [2], "victim_args": {"trainer.max_epochs": 3}}],
        "slurm": {"all": {"slurm_partition": "gpu", "timeout_min": 60, "gpus_per_node": 2, "cpus_per_task": 4},
                  "victim": {"timeout_min": 30, "slurm_additional_parameters": {"qos": "low"}}}})


def test_a_listing_read_by_a_pipe_that_closes_early_ends_quietly(tmp_path):
    """``ue grid status g.yaml | head -1``: the listing stops when the reader goes, without a traceback."""
    grid_file = _write(tmp_path / "many.yaml", {  # 1000 cells, 100 kB of listing: more than a pipe buffers
        "datasets": {"d": str(REPO / "configs/data/digits.yaml")}, "sources": {"clean": None},
        "victims": {"v": str(REPO / "configs/victim/digits.yaml")}, "seeds": list(range(1000))})
    proc = subprocess.Popen([sys.executable, "-m", "ue_lightning.cli", "grid", "status", str(grid_file)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.stdout.readline().startswith("pending ")
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(timeout=60) == 0 and "Traceback" not in err and "BrokenPipe" not in err, err


def test_expansion_shares_generators_and_score(tmp_path):
    grid = load_grid(_fake_grid(tmp_path))
    kinds = [s.kind for s in grid.stages.values()]
    # clean: 2 radii x 2 seeds (no surrogate, no protected share) + 2 radii of seed 2 (the second part);
    # each generator: 2 surrogates x 2 radii x 2 shares x 2 seeds
    assert len(grid.cells) == 4 + 2 + 2 * 16
    assert kinds == ["score"] + ["generator"] * 4 + ["victim"] * len(grid.cells)
    generators = [s for s in grid.stages.values() if s.kind == "generator"]
    score = next(s for s in grid.stages.values() if s.kind == "score")
    assert [g.needs for g in generators] == [[], [], [score.key], [score.key]]
    assert all(str(score.checkpoint) in g.args for g in generators[2:])
    assert any("vgg16" in g.args for g in generators) and grid.order["surrogate"] == ["resnet18", "vgg16"]
    assert load_grid(grid.path).stages.keys() == grid.stages.keys()  # stable
    picked = select(grid, ["source=collapse", "surrogate=vgg16", "seed=1", "protected_fraction=0.50"])
    assert len(picked) == 2 and {c["adv_radius"] for c in picked} == {0, 8}
    assert [s.kind for s in stages_for(grid, picked)] == ["score", "generator", "victim", "victim"]
    with pytest.raises(ValueError, match="AXIS=VALUE"):
        select(grid, ["bogus=1"])


def test_clean_rest_cells_train_on_each_fractions_clean_part_without_noise(tmp_path):
    grid = load_grid(_write(tmp_path / "g.yaml", {
        "datasets": {"d": str(REPO / "configs/data/digits.yaml")}, "victims": {"v": str(REPO / "configs/victim/digits.yaml")},
        "sources": {"clean": None, "rest": "clean-rest", "random": str(REPO / "configs/generator/random.yaml")},
        "protected_fractions": [0.5, 1.0], "seeds": [0]}))
    rest = [c for c in grid.cells if c["source"] == "rest"]
    assert [c["protected_fraction"] for c in rest] == [0.5]  # no cell at 100%: nothing would be left
    stage = grid.stages[rest[0]["key"]]
    args = dict(zip(stage.args[::2], stage.args[1::2]))
    assert args["--data.protected_fraction"] == "0.5" and args["--data.drop_protected"] == "true"
    assert "--data.perturbation" not in args and stage.needs == []  # no noise is made or read for it
    noised = next(grid.stages[c["key"]] for c in grid.cells if c["source"] == "random" and c["protected_fraction"] == 0.5)
    assert "--data.drop_protected" not in noised.args
    assert len(grid.cells) == 1 + 1 + 2


def test_grid_errors_name_the_fix(tmp_path):
    base = {"datasets": {"d": str(REPO / "configs/data/digits.yaml")},
            "victims": {"v": str(REPO / "configs/victim/digits.yaml")}}
    with pytest.raises(ValueError, match="score"):  # collapse without its score model
        load_grid(_write(tmp_path / "a.yaml", {**base, "sources": {
            "c": [str(REPO / f"configs/generator/{m}.yaml") for m in ("rem", "collapse")]}}))
    with pytest.raises(ValueError, match="unknown keys"):
        load_grid(_write(tmp_path / "b.yaml", {**base, "sources": {"clean": None}, "seed": [0]}))
    with pytest.raises(FileNotFoundError, match="relative to the directory"):
        load_grid(_write(tmp_path / "c.yaml", {**base, "sources": {"x": "configs/generator/nope.yaml"}}))


@pytest.mark.parametrize("name", ["../outside", "/ABS/outside", "sub/outside", "..", "a\\..\\outside"])
def test_a_grid_name_that_is_not_a_plain_file_name_is_refused_and_nothing_is_written(name, tmp_path, capsys):
    from ue_lightning.cli import main

    name = name.replace("/ABS", str(tmp_path))
    grid_file = _write(tmp_path / "g.yaml", {"name": name, "output": str(tmp_path / "out" / "grid"),
                                             "datasets": {"d": str(REPO / "configs/data/digits.yaml")},
                                             "sources": {"clean": None},
                                             "victims": {"v": str(REPO / "configs/victim/digits.yaml")}})
    for command in ("table", "status", "run"):
        with pytest.raises(SystemExit) as stop:
            main(["grid", command, str(grid_file)])
        err = capsys.readouterr().err
        assert stop.value.code == 2 and "not a plain file name" in err and len(err.strip().splitlines()) <= 2, err
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["g.yaml"]  # no table written, anywhere


def test_table_mean_std_over_seeds(tmp_path):
    """Fake results in the cells' folders: the table averages seeds and shows clean in every share's column."""
    grid = load_grid(_fake_grid(tmp_path))
    accuracy = {("clean", 0): [0.9, 0.8], ("em", 0): [0.2, 0.3], ("em", 8): [0.5]}
    for cell in grid.cells:
        values = accuracy.get((cell["source"], cell["adv_radius"]))
        if values and cell["seed"] < len(values) and cell["surrogate"] in (None, "resnet18") \
                and cell["protected_fraction"] in (None, 1.0):
            result = grid.victim(cell).result
            result.parent.mkdir(parents=True)
            result.write_text(json.dumps({**cell, "test_acc": values[cell["seed"]], "train_acc": 1.0}))
    md = markdown(grid, [json.loads(grid.victim(c).result.read_text()) for c in grid.cells
                         if grid.victim(c).done()])
    assert ("| noise source | rho_a=0, protected=0.5 | rho_a=0, protected=1 | rho_a=8, protected=0.5 | "
            "rho_a=8, protected=1 |") in md
    assert "| clean | 85.0 ± 7.1 (2) | 85.0 ± 7.1 (2) | - | - |" in md
    assert "| em (resnet18) | - | 25.0 ± 7.1 (2) | - | 50.0 (1) |" in md
    assert "| collapse (vgg16) | - | - | - | - |" in md
    paths = render(grid)
    assert paths["picture"].stat().st_size > 0 and len(paths["csv"].read_text().splitlines()) == 1 + 4


def test_slurm_submits_one_job_a_stage_with_dependencies(tmp_path, monkeypatch):
    submitit = pytest.importorskip("submitit")
    from ue_lightning.grid.slurm import StageJob

    grid_file = _fake_grid(tmp_path)
    grid = load_grid(grid_file)
    done = grid.victim(grid.cells[0])
    done.result.parent.mkdir(parents=True)
    done.result.write_text("{}")  # finished before: not submitted again
    executor = MagicMock()
    executor.submit.side_effect = [MagicMock(job_id=str(100 + i)) for i in range(len(grid.stages))]
    auto = MagicMock(return_value=executor)
    monkeypatch.setattr(submitit, "AutoExecutor", auto)
    run_grid(str(grid_file), executor="slurm", only=["source=clean,collapse", "surrogate=vgg16", "seed=0"])

    auto.assert_called_once_with(folder=str(tmp_path / "out" / "slurm" / "%j"), cluster="slurm")
    submitted = [call.args for call in executor.submit.call_args_list]
    params = [call.kwargs for call in executor.update_parameters.call_args_list]
    assert all(isinstance(fn, StageJob) for fn, _ in submitted)
    stages = [stage for _, stage in submitted]
    # clean seed 0 at rho_a 8 (rho_a 0 is done), then score, generator, 2 radii x 2 shares of collapse (vgg16)
    assert [s.kind for s in stages] == ["score", "generator"] + ["victim"] * 5
    assert stages[0].kind == "score" and params[0]["slurm_additional_parameters"] == {}
    assert params[0] | {"name": None} == {"name": None, "slurm_partition": "gpu", "timeout_min": 60,
                                          "gpus_per_node": 2, "tasks_per_node": 2, "cpus_per_task": 4,
                                          "slurm_additional_parameters": {}}
    assert params[1]["slurm_additional_parameters"] == {"dependency": "afterok:100"}
    for stage, p in zip(stages[2:], params[2:]):
        assert p["timeout_min"] == 30 and p["slurm_additional_parameters"]["qos"] == "low"
        assert p["slurm_additional_parameters"].get("dependency") == (
            None if stage.cell["source"] == "clean" else "afterok:101")
    args = stages[2].args  # one DDP process a GPU, as SLURM's tasks
    assert args[-8:] == ["--trainer.accelerator", "gpu", "--trainer.devices", "2", "--trainer.num_nodes", "1",
                         "--trainer.strategy", "ddp"]
    assert not any(Path(s.folder).exists() for s in stages)  # nothing ran here
    jobs = json.loads((tmp_path / "out" / "slurm" / "g.jobs.json").read_text())
    assert sorted(j["job"] for j in jobs.values()) == [str(100 + i) for i in range(7)]


def test_failed_stage_is_reported_and_its_dependants_skipped(tmp_path, capsys):
    grid = load_grid(_write(tmp_path / "f.yaml", {
        "output": str(tmp_path / "out"),
        "datasets": {"d": str(REPO / "configs/data/digits.yaml")},
        "sources": {"em": {"generator": str(REPO / "configs/generator/em-classwise.yaml"),
                           "args": {"model.init_args.width": -3}}},
        "victims": {"v": str(REPO / "configs/victim/digits.yaml")}}))
    failed = run_local(list(grid.stages.values()))
    assert [s.kind for s in failed] == ["generator", "victim"]
    out = capsys.readouterr().out
    assert "FAILED noise em (d)" in out and "skip  em -> v on d" in out
    assert "width" in (Path(failed[0].folder) / "log.txt").read_text()


def test_a_failed_stage_does_not_end_the_run_the_others_go_on_and_it_exits_1(tmp_path, capsys):
    from ue_lightning.cli import main

    quick = {"config": str(REPO / "configs/victim/digits.yaml"),
             "args": {"model.init_args.width": 4, "trainer.max_epochs": 1, "data.train_subset": 64, "data.resize": 8}}
    grid_file = _write(tmp_path / "f.yaml", {
        "output": str(tmp_path / "out"), "datasets": {"d": str(REPO / "configs/data/digits.yaml")},
        # a setting the stage's command line refuses (jsonargparse exits), in the first stage to run
        "sources": {"bad": {"generator": str(REPO / "configs/generator/random.yaml"),
                            "args": {"model.init_args.no_such_setting": 1}}, "clean": None},
        "victims": {"v": quick}})
    with pytest.raises(SystemExit) as stop:
        main(["grid", "run", str(grid_file)])
    out, err = capsys.readouterr()
    assert stop.value.code == 1, out + err
    assert "FAILED noise bad (d)" in out and "skip  bad -> v on d" in out and "done  clean -> v on d" in out
    grid = load_grid(grid_file)
    assert [grid.victim(c).done() for c in grid.cells] == [False, True]
    noise = grid.stages[grid.victim(grid.cells[0]).needs[0]]
    assert "2 stage(s) failed" in err and "no_such_setting" in (Path(noise.folder) / "log.txt").read_text()


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _run_until_fitting(tmp_path: Path, fake_npz: Path, jobs: int, seeds: list[int]) -> tuple[Path, subprocess.Popen]:
    """``ue grid run --jobs N`` of clean cells whose victims would train for ever, returned once one is fitting
    (its first checkpoint written); the caller stops it (and kills it at the end)."""
    long_victim = {**TINY_VICTIM, "args": {**TINY_VICTIM["args"], "trainer.max_epochs": 100000}}
    grid_file = _write(tmp_path / "long.yaml", {"output": str(tmp_path / "out"),
                                                "datasets": {"fake": _npz_dataset(fake_npz)},
                                                "sources": {"clean": None}, "victims": {"r18w4": long_victim},
                                                "seeds": seeds})
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    runner = subprocess.Popen([sys.executable, "-m", "ue_lightning.cli", "grid", "run", str(grid_file),
                               "--jobs", str(jobs)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    deadline = time.monotonic() + 120
    while not any(p.name == "last.ckpt" for p in (tmp_path / "out" / "cells").rglob("*.ckpt")):
        if runner.poll() is not None or time.monotonic() > deadline:
            runner.kill()
            pytest.fail(f"the grid stopped or never began fitting:\n{runner.communicate()[0]}")
        time.sleep(0.5)
    return grid_file, runner


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads the process tree from /proc")
def test_sigterm_stops_the_pools_running_stages(tmp_path, fake_npz):
    """A runner stopped by SIGTERM ends the stage its pool is running instead of leaving it to write the cell
    beside the next runner (Lightning's own SIGTERM handler keeps a fit alive until its next batch)."""
    grid_file, runner = _run_until_fitting(tmp_path, fake_npz, jobs=2, seeds=[0])
    try:
        children = [int(pid) for pid in Path(f"/proc/{runner.pid}/task/{runner.pid}/children").read_text().split()]
        workers = [pid for pid in children if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()]
        assert workers and any(_alive(pid) for pid in workers)
        runner.send_signal(signal.SIGTERM)
        start = time.monotonic()
        out, _ = runner.communicate(timeout=90)
        seconds = time.monotonic() - start
    finally:
        runner.kill()
    assert runner.returncode == 128 + signal.SIGTERM, out
    assert "stopped: ending the running stages" in out
    assert not any(_alive(pid) for pid in workers), out
    assert seconds < 30, f"the stage took {seconds:.0f} s to end: it waited for the grace period, not its SIGTERM"
    stage = load_grid(grid_file).victim(load_grid(grid_file).cells[0])
    assert not stage.done()  # the cell is not marked done; its checkpoint is kept for the rerun
    assert stage.checkpoint.is_file()


def test_sigterm_stops_a_one_job_run_in_this_process_not_just_its_stage(tmp_path, fake_npz):
    """With ``--jobs 1`` the stages run in the runner's own process: SIGTERM ends the run there too (it once ended
    only the running fit, which the runner took for a failed stage before it started the next one)."""
    grid_file, runner = _run_until_fitting(tmp_path, fake_npz, jobs=1, seeds=[0, 1])
    try:
        runner.send_signal(signal.SIGTERM)
        out, _ = runner.communicate(timeout=90)
    finally:
        runner.kill()
    assert runner.returncode == 128 + signal.SIGTERM, out
    assert out.count("start ") == 1 and "FAILED" not in out and "stopped:" in out, out
    grid = load_grid(grid_file)
    assert not any(grid.victim(c).done() for c in grid.cells)


def test_jobs_below_one_is_refused(tmp_path, capsys):
    from ue_lightning.grid import main

    grid_file = _write(tmp_path / "g.yaml", {"output": str(tmp_path / "out"),
                                             "datasets": {"d": str(REPO / "configs/data/digits.yaml")},
                                             "sources": {"clean": None},
                                             "victims": {"v": str(REPO / "configs/victim/digits.yaml")}})
    with pytest.raises(SystemExit):
        main(["run", str(grid_file), "--jobs", "0"])
    assert "--jobs must be at least 1" in capsys.readouterr().err
    with pytest.raises(ValueError, match="at least 1"):
        run_local(list(load_grid(grid_file).stages.values()), jobs=0)
    assert not (tmp_path / "out" / "cells").exists()  # nothing ran


@pytest.mark.parametrize("argv, says", [(["status"], "required: grid"), (["bogus"], "invalid choice: 'bogus'"),
                                        (["run", "g.yaml", "--jobs", "0"], "--jobs must be at least 1")])
def test_a_refused_grid_command_line_is_one_line_without_the_usage(argv, says, capsys):
    from ue_lightning.grid import main

    with pytest.raises(SystemExit) as stop:  # argparse printed its usage line before the message
        main(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and len(err.rstrip("\n").splitlines()) == 1, err
    assert err.startswith("ue: error: ue grid") and says in err and "--help" in err, err


def test_a_victim_trains_as_soon_as_its_noise_exists(tmp_path, fake_npz):
    """With --jobs 2, the victims of clean data and of quick noise train while a slow generator still runs:
    stages wait for their own inputs, not for every generator of the grid."""
    slow_rem = {"generator": str(REPO / "configs/generator/rem.yaml"),
                "args": {"model.init_args.width": 4, "model.init_args.steps": 1, "model.init_args.adv_steps": 1,
                         "model.init_args.eot_samples": 1, "trainer.max_steps": 100000}}
    grid_file = _write(tmp_path / "g.yaml", {
        "output": str(tmp_path / "out"), "datasets": {"fake": _npz_dataset(fake_npz)},
        "sources": {"clean": None, "random": str(REPO / "configs/generator/random.yaml"), "rem": slow_rem},
        "victims": {"r18w4": TINY_VICTIM}})
    grid = load_grid(grid_file)
    clean, random, rem = (grid.victim(c) for c in grid.cells)
    noise = grid.stages[rem.needs[0]]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    runner = subprocess.Popen([sys.executable, "-m", "ue_lightning.cli", "grid", "run", str(grid_file), "--jobs", "2"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        deadline = time.monotonic() + 240
        while not (clean.done() and random.done()):
            assert runner.poll() is None and time.monotonic() < deadline, "the quick victims did not finish"
            time.sleep(0.5)
        assert not noise.done() and not rem.done()  # the slow noise is still being made
        runner.send_signal(signal.SIGTERM)
        out, _ = runner.communicate(timeout=90)
    finally:
        runner.kill()
    assert out.index("start noise rem") < out.index("done  clean -> r18w4") < out.index("stopped:"), out
    assert "start rem -> r18w4" not in out


@pytest.mark.parametrize("path", sorted((REPO / "grids").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_grids_expand(path, monkeypatch):
    monkeypatch.chdir(REPO)
    header = path.read_text().splitlines()[0]
    assert header.startswith("# "), f"{path.name}: say what it reproduces in a header comment"
    grid = load_grid(path)
    assert grid.cells and all(os.path.isfile(c) for s in grid.stages.values() for c in s.configs)
    assert grid.output.parent == REPO / "runs" / "grids"
    for stage in grid.stages.values():  # overrides name real settings and architectures
        keys = stage.args[::2]
        assert all(k.split(".")[0] in ("--data", "--model", "--trainer", "--seed_everything") for k in keys), keys
        if "--model.init_args.arch" in keys:
            assert stage.args[stage.args.index("--model.init_args.arch") + 1] in ARCHITECTURES
