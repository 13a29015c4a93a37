"""`ue pipeline`'s table does not depend on how many stages run at once, nor on the caller's thread count.

Each stage runs in a worker process on one CPU thread (the grid runner's `threads=1`), so a
run with one job at one thread and a run with two jobs at two threads must agree to the last bit: the
noise files and every victim's accuracies. Without the pinning the two runs' floats are summed in
different orders and the noise files differ. The two-job run is `ue pipeline` in a subprocess, as a user runs
it: its console shows the pipeline's own lines only (stages, table, verdicts), no warning.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import CONSOLE_NOISE, REPO, run_console, tiny_pipeline_configs
from ue_lightning.data import NoiseFile
from ue_lightning.pipeline import run_pipeline


GENERATORS = ("em-classwise", "tue", "collapse")


def _noise(folder: Path) -> dict[str, np.ndarray]:
    return {name: np.array(NoiseFile.open(folder / "noise" / f"{name}.safetensors").delta) for name in GENERATORS}


def _check_console(out: str) -> None:
    """Every line is one of the pipeline's own: 8 stages (score, 3 generators, 4 victims), each announced and
    timed; a blank line; the table's caption, header, rule and 4 rows; 3 verdicts. No warning."""
    lines = out.splitlines()
    assert not [line for line in lines if CONSOLE_NOISE.search(line)], out
    stages = [line for line in lines if line.startswith("== ")]
    assert [s.split("]")[0] for s in stages] == [f"== [{i}/8" for i in range(1, 9)], out
    ends = [line.split("]")[0] for line in lines if re.fullmatch(r"   \[\d/8\] done \(\d+ s\)", line)]
    assert sorted(ends) == [f"   [{i}/8" for i in range(1, 9)], out
    table = [line for line in lines if line.startswith("|")]
    assert len(table) == 6 and len({len(row) for row in table}) == 1, out  # columns aligned
    assert [row.split("|")[1].strip() for row in table[2:]] == ["clean", *GENERATORS]
    verdicts = [line for line in lines if " on clean data -> " in line]
    assert [v.split(":")[0] for v in verdicts] == list(GENERATORS), out
    assert len({v.index("% vs") for v in verdicts}) == 1, out  # accuracies aligned
    assert len(stages) * 2 + 1 + 1 + len(table) + len(verdicts) == len(lines), out


def test_table_and_noise_are_the_same_for_one_and_two_jobs_and_threads(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    configs = tiny_pipeline_configs(tmp_path)
    generators = {name: configs[name] for name in GENERATORS}
    data = str(REPO / "configs/data/digits.yaml")
    before = torch.get_num_threads()
    try:  # as `OMP_NUM_THREADS=1 ue pipeline --jobs 1`, in process
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        torch.set_num_threads(1)
        one = run_pipeline(data=data, score=configs["score"], generators=generators, victim=configs["victim"],
                           workdir=str(tmp_path / "one"), jobs=1)
    finally:
        torch.set_num_threads(before)
    # as `OMP_NUM_THREADS=2 ue pipeline --jobs 2` on a console (workers inherit the variable)
    out = run_console("pipeline", "--data", data, "--score", json.dumps(configs["score"]),
                      "--generators", json.dumps(generators), "--victim", json.dumps(configs["victim"]),
                      "--workdir", str(tmp_path / "two"), "--jobs", "2", cwd=tmp_path, threads=2)
    _check_console(out)
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert one == two
    assert list(one) == ["clean", *GENERATORS]  # rows in the stages' order
    noise_one, noise_two = _noise(tmp_path / "one"), _noise(tmp_path / "two")
    for name, delta in noise_one.items():
        assert np.array_equal(delta, noise_two[name]), name
        assert np.abs(delta).max() > 0, name  # a noise was made
        assert (tmp_path / "one" / "generator" / f"{name}.ckpt").resolve().is_file()  # for `ue protect --checkpoint`
    assert (tmp_path / "one" / "score.ckpt").resolve().is_file()
    capsys.readouterr()
    again = run_pipeline(data=data, score=configs["score"], generators=generators, victim=configs["victim"],
                         workdir=str(tmp_path / "one"), jobs=1)  # a rerun: the grid's stages are done
    assert again == one
    out = capsys.readouterr().out
    assert out.startswith("8 of 8 stages already done in ") and "== [" not in out, out


def test_jobs_below_one_is_refused(tmp_path):
    with pytest.raises(ValueError, match="jobs=0"):
        run_pipeline(workdir=str(tmp_path), jobs=0, data=str(REPO / "configs/data/digits.yaml"),
                     score=str(REPO / "configs/score/dsm.yaml"), victim=str(REPO / "configs/victim/digits.yaml"))


def test_a_file_where_a_named_link_goes_is_refused_and_kept(tmp_path):
    """A workdir of an earlier pipeline, which wrote generator/<name>.ckpt as files: refused before any stage runs."""
    earlier = tmp_path / "generator" / "tue.ckpt"
    earlier.parent.mkdir()
    earlier.write_bytes(b"an earlier checkpoint")
    with pytest.raises(FileExistsError, match="generator/tue.ckpt, a file .*nothing was run"):
        run_pipeline(workdir=str(tmp_path), jobs=1, data=str(REPO / "configs/data/digits.yaml"),
                     score=str(REPO / "configs/score/dsm.yaml"), victim=str(REPO / "configs/victim/digits.yaml"),
                     generators={"tue": str(REPO / "configs/generator/tue.yaml")})
    assert earlier.read_bytes() == b"an earlier checkpoint" and not (tmp_path / "noise").exists()
