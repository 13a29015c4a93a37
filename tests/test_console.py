"""A quiet console: `ue fit` prints its own lines and no warning; bars only on a terminal.

The runs are subprocesses, so their whole output (stdout and stderr, in order) is what a user sees,
warnings filters included (no PYTHONWARNINGS here, unlike tests.conftest.run_ue). `ue pipeline`'s console
is checked on the two-job run of tests/test_pipeline.py.
"""

from __future__ import annotations

import io
import sys
from types import SimpleNamespace

import pytest
from lightning.pytorch.callbacks import TQDMProgressBar

from conftest import CONSOLE_NOISE, config_args, run_console, shipped
from ue_lightning.console import progress


def test_fit_logs_tensorboard_and_csv_without_warnings(tmp_path):
    """`ue fit` of an EM generator (round checkpoints, no validation step) on the digits, one round."""
    out = run_console("fit", *config_args(*shipped("digits", "generator/em-classwise")),
                      "--model.init_args.max_rounds", "1", "--trainer.enable_progress_bar", "false", cwd=tmp_path)
    assert not [line for line in out.splitlines() if CONSOLE_NOISE.search(line)], out
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
