"""A quiet console: `ue pipeline` and `ue fit` print their own lines and no warning; bars only on a terminal.

The runs are subprocesses, so their whole output (stdout and stderr, in order) is what a user sees,
warnings filters included (no PYTHONWARNINGS here, unlike tests.conftest.run_ue).
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from lightning.pytorch.callbacks import TQDMProgressBar

from conftest import REPO, config_args, shipped, tiny_pipeline_configs
from ue_lightning.console import progress

#: What a warning looks like on the console: Python's "file.py:12: Category: message" and Lightning's
#: "file.py:12: message" (its rank_zero_warn drops the category); Lightning's tips; a traceback.
NOISE = re.compile(r"\.py:\d+: |Warning|warn|deprecat|Tip:|Traceback", re.IGNORECASE)

def _run(*args: str, cwd: Path) -> str:
    """``python -m ue_lightning.cli ARGS`` at one thread; its stdout and stderr, interleaved as printed."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "ue_lightning.cli", *args], cwd=cwd, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300)
    assert proc.returncode == 0, proc.stdout[-5000:]
    return proc.stdout


def test_pipeline_prints_its_stages_table_and_verdicts_only(tmp_path):
    configs = tiny_pipeline_configs(tmp_path)
    generators = {name: configs[name] for name in ("em-classwise", "tue", "collapse")}
    out = _run("pipeline", "--data", str(REPO / "configs/data/digits.yaml"), "--score", json.dumps(configs["score"]), "--generators", json.dumps(generators),
               "--victim", json.dumps(configs["victim"]), "--workdir", str(tmp_path / "work"), "--jobs", "2", cwd=tmp_path)
    lines = out.splitlines()
    assert not [line for line in lines if NOISE.search(line)], out

    # Every line is one of the pipeline's own: 8 stages (score, 3 generators, 4 victims), each announced and
    # timed; a blank line; the table's caption, header, rule and 4 rows; 3 verdicts.
    stages = [line for line in lines if line.startswith("== ")]
    assert [s.split("]")[0] for s in stages] == [f"== [{i}/8" for i in range(1, 9)], out
    ends = [line.split("]")[0] for line in lines if re.fullmatch(r"   \[\d/8\] done \(\d+ s\)", line)]
    assert sorted(ends) == [f"   [{i}/8" for i in range(1, 9)], out
    table = [line for line in lines if line.startswith("|")]
    assert len(table) == 6 and len({len(row) for row in table}) == 1, out  # columns aligned
    assert [row.split("|")[1].strip() for row in table[2:]] == ["clean", "em-classwise", "tue", "collapse"]
    verdicts = [line for line in lines if " on clean data -> " in line]
    assert [v.split(":")[0] for v in verdicts] == ["em-classwise", "tue", "collapse"], out
    assert len({v.index("% vs") for v in verdicts}) == 1, out  # accuracies aligned
    assert len(stages) * 2 + 1 + 1 + len(table) + len(verdicts) == len(lines), out


def test_fit_logs_tensorboard_and_csv_without_warnings(tmp_path):
    """`ue fit` of an EM generator (round checkpoints, no validation step) on the digits, one round."""
    out = _run("fit", *config_args(*shipped("digits", "generator/em-classwise")),
               "--model.init_args.max_rounds", "1", "--trainer.enable_progress_bar", "false", cwd=tmp_path)
    assert not [line for line in out.splitlines() if NOISE.search(line)], out
    logs = tmp_path / "runs/generator/em-classwise-digits/lightning_logs"
    assert [p.name for p in logs.iterdir()] == ["version_0"]  # one folder for both loggers
    assert (logs / "version_0/metrics.csv").read_text().startswith("em/pass_acc")
    assert list((logs / "version_0").glob("events.out.tfevents.*"))


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _trainer(bar=None, rank0: bool = True):
    return SimpleNamespace(progress_bar_callback=bar, is_global_zero=rank0)


@pytest.mark.parametrize("trainer, shown", [
    (_trainer(TQDMProgressBar()), True),
    (_trainer(None), False),  # Lightning's bar off (`ue pipeline` off a terminal, enable_progress_bar false)
    (_trainer(TQDMProgressBar(refresh_rate=0)), False),
    (_trainer(TQDMProgressBar(), rank0=False), False),
], ids=["lightning-bar", "no-lightning-bar", "bar-disabled", "rank-1"])
def test_a_loop_inside_lightning_shows_a_bar_below_lightnings_only(monkeypatch, trainer, shown):
    monkeypatch.setattr(sys, "stdout", _Terminal())
    with progress(range(3), desc="EM noise pass 1", trainer=trainer) as bar:
        assert bar.disable is not shown and list(bar) == [0, 1, 2]
    assert ("EM noise pass 1" in sys.stdout.getvalue()) is shown


def test_a_bar_is_shown_on_a_terminal_only(monkeypatch):
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # a file or a pipe
    with progress(desc="export (png)", total=10, unit="image") as bar:
        bar.update(10)
    assert sys.stderr.getvalue() == ""
    monkeypatch.setattr(sys, "stderr", _Terminal())
    with progress(desc="export (png)", total=10, unit="image") as bar:
        bar.update(10)
    assert "export (png)" in sys.stderr.getvalue()
