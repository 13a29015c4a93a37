"""benchmarks/gpu_check.py: on a GPU (marked ``gpu``, skipped without one), its CPU dry run, its message without
a GPU, and the comparison that decides a stage's verdict (relative loss differences, pixels and budgets as the
script states them: [0, 1] and 1/255)."""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO

SCRIPT = REPO / "benchmarks" / "gpu_check.py"
STAGES = ("score", "em-samplewise", "em-classwise", "tue", "rem", "collapse", "victim-at")


def _load_script():
    if "gpu_check" not in sys.modules:  # its dataclasses look their module up there
        spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
        sys.modules["gpu_check"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules["gpu_check"])
    return sys.modules["gpu_check"]


def _run(*args: str, timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _assert_every_stage_ok(returncode: int, stdout: str, stderr: str = "") -> None:
    assert returncode == 0, f"{stdout[-4000:]}\n{stderr[-4000:]}"
    rows = {line.split("|")[1].strip(): line for line in stdout.splitlines() if line.startswith("| ")}
    for stage in STAGES:
        assert stage in rows, f"no table row for {stage}:\n{stdout[-4000:]}"
        assert rows[stage].split("|")[-2].strip() == "ok", rows[stage]
    assert "gpu_check: all stages ok" in stdout


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_every_stage_agrees_between_cuda_and_cpu():
    proc = _run(timeout=600)
    _assert_every_stage_ok(proc.returncode, proc.stdout, proc.stderr)


def test_dry_run_on_cpu_runs_every_stage(capsys):
    # in process at one thread, as a subprocess with OMP_NUM_THREADS=1 (which spent seconds importing torch)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        returncode = _load_script().main(["--device", "cpu"])
    finally:
        torch.set_num_threads(threads)
    _assert_every_stage_ok(returncode, capsys.readouterr().out)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is there")
def test_without_cuda_it_exits_with_one_line_naming_the_fix(capsys):
    # in process (a subprocess spent ~13 s importing torch for one line): Python prints a SystemExit's
    # message, as the only line, on stderr and exits 1
    with pytest.raises(SystemExit) as exit_:
        _load_script().main([])
    assert exit_.value.code == _load_script().NO_CUDA
    assert len(exit_.value.code.splitlines()) == 1 and "--device cpu" in exit_.value.code
    assert capsys.readouterr().out == ""


def test_a_first_step_or_any_step_out_of_tolerance_fails_the_stage():
    g = _load_script()
    smooth, signed = g.Stage("s", (), 2, ("loss",)), g.Stage("r", (), 2, ("loss",), signed_first=True)
    tolerance = g.Tolerance(every=0.05, first=1e-3)
    reference = {("loss", 0): 2.0, ("loss", 1): 1.0}

    def problems(stage, checked):
        return g.compare(stage, checked, reference, tolerance)[2]

    assert problems(smooth, {("loss", 0): 2.0 * (1 + 5e-4), ("loss", 1): 1.0 * 1.04}) == []
    assert problems(smooth, {("loss", 0): 2.0 * (1 + 2e-3), ("loss", 1): 1.0}) != []  # first step: 1e-3
    assert problems(signed, {("loss", 0): 2.0 * (1 + 2e-3), ("loss", 1): 1.0}) == []  # a sign step first: 0.05
    assert problems(signed, {("loss", 0): 2.0, ("loss", 1): 1.0 * 1.06}) != []
    assert problems(smooth, {("loss", 0): 2.0, ("loss", 1): math.nan}) != []
    assert problems(smooth, {("loss", 0): 2.0}) != []  # a step not logged
    first, worst, _ = g.compare(smooth, {("loss", 0): 2.2, ("loss", 1): 1.0}, reference, tolerance)
    assert first == pytest.approx(0.2 / 2.2) and worst == first


def test_host_random_draws_from_the_cpu_stream_on_any_device():
    g = _load_script()
    torch.manual_seed(0)
    expected = [torch.rand(3), torch.randn(2, 2), torch.rand(4)]
    torch.manual_seed(0)
    with g.HostRandom():
        drawn = [torch.rand(3, device="meta"), torch.randn_like(torch.empty(2, 2, device="meta"))]
        after = torch.rand(4)
    assert [t.device.type for t in drawn] == ["meta", "meta"]
    assert torch.equal(after, expected[2])  # the meta draws took the CPU stream's numbers, in order
