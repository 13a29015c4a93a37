"""`ue pipeline`'s table does not depend on how many stages run at once, nor on the caller's thread count.

Each stage runs in a worker process on one CPU thread (`ue_lightning.pipeline._one_thread_worker`), so a
run with one job at one thread and a run with two jobs at two threads must agree to the last bit: the
noise files and every victim's accuracies. Without the pinning the two runs' floats are summed in
different orders and the noise files differ.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import REPO, tiny_pipeline_configs
from ue_lightning.data import NoiseFile
from ue_lightning.pipeline import run_pipeline


def _run(folder, configs, jobs: int):
    generators = {name: configs[name] for name in ("em-classwise", "tue", "collapse")}
    results = run_pipeline(data=str(REPO / "configs/data/digits.yaml"), score=configs["score"], generators=generators,
                           victim=configs["victim"], workdir=str(folder), jobs=jobs)
    noise = {name: np.array(NoiseFile.open(folder / "noise" / f"{name}.safetensors").delta) for name in generators}
    return results, noise


def test_table_and_noise_are_the_same_for_one_and_two_jobs_and_threads(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    configs = tiny_pipeline_configs(tmp_path)
    before = torch.get_num_threads()
    try:  # as `OMP_NUM_THREADS=1 ue pipeline` and `OMP_NUM_THREADS=2 ue pipeline` (workers inherit the variable)
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        torch.set_num_threads(1)
        one = _run(tmp_path / "one", configs, jobs=1)
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        torch.set_num_threads(2)
        two = _run(tmp_path / "two", configs, jobs=2)
    finally:
        torch.set_num_threads(before)
    assert one[0] == two[0]
    assert list(one[0]) == ["clean", "em-classwise", "tue", "collapse"]  # rows in the stages' order
    for name, delta in one[1].items():
        assert np.array_equal(delta, two[1][name]), name
        assert np.abs(delta).max() > 0, name  # a noise was made


def test_jobs_below_one_is_refused(tmp_path):
    with pytest.raises(ValueError, match="jobs=0"):
        run_pipeline(workdir=str(tmp_path), jobs=0, data=str(REPO / "configs/data/digits.yaml"),
                     score=str(REPO / "configs/score/dsm.yaml"), victim=str(REPO / "configs/victim/digits.yaml"))
