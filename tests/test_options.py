"""Every option `ue fit|predict` offers for the package's modules and DataModule has help text."""

from __future__ import annotations

import inspect

import pytest
from jsonargparse import ArgumentParser

import ue_lightning.modules as modules
from ue_lightning.data import UEDataModule

CLASSES = [cls for _, cls in inspect.getmembers(modules, inspect.isclass) if cls.__module__.startswith("ue_lightning")]


def _options_without_help(cls) -> list[str]:
    parser = ArgumentParser()
    parser.add_class_arguments(cls, "model")
    return [a.dest for a in parser._actions
            if a.dest.startswith("model.") and a.dest != "model.help" and not (a.help or "").strip()]


@pytest.mark.parametrize("cls", [*CLASSES, UEDataModule], ids=lambda c: c.__name__)
def test_every_option_has_help(cls):
    assert _options_without_help(cls) == []


def test_the_check_sees_the_modules():
    names = {c.__name__ for c in CLASSES}
    assert {"VictimClassifier", "ErrorMinimizingNoise", "RobustNoiseGenerator", "ScoreEstimator",
            "TransferableNoise"} <= names


@pytest.mark.parametrize("argv", [[], ["--help"], ["-h"]], ids=["bare", "--help", "-h"])
def test_ue_help_lists_every_command(argv, capsys):
    from ue_lightning.cli import main

    main(argv)
    out = capsys.readouterr().out
    for command in ("fit", "validate", "test", "predict", "export", "pipeline"):
        assert f"\n  {command} " in out, command
