"""Every shipped config instantiates what it names: its model (class and init_args) and its DataModule.

The data is not read (UEDataModule loads lazily; collapse configs load their score model in
setup()), so configs for datasets absent here (CIFAR, the ImageNet subset) are checked too.
A renamed or removed argument, a bad choice or an out-of-range budget fails here, not an hour
into a user's run.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from ue_lightning.data import UEDataModule

CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))


def _load_class(class_path: str):
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def test_there_are_configs_of_every_kind():
    kinds = {p.parent.name for p in CONFIGS}
    assert {"data", "generator", "score", "victim"} <= kinds and len(CONFIGS) > 50


@pytest.mark.parametrize("path", CONFIGS, ids=[str(p.relative_to(REPO / "configs")) for p in CONFIGS])
def test_config_instantiates_its_model_and_data(path: Path):
    cfg = yaml.safe_load(path.read_text()) or {}
    assert set(cfg) <= {"seed_everything", "data", "model", "trainer", "ckpt_path"}, set(cfg)
    if "data" in cfg:
        UEDataModule(**cfg["data"])
    if "model" in cfg:
        model = cfg["model"]
        cls, args = _load_class(model["class_path"]), model.get("init_args") or {}
        try:
            cls(**args)
        except FileNotFoundError as error:  # a config that needs a fitted model first (TAP) must name it
            needed = [str(v) for k, v in args.items() if k.endswith("_checkpoint")]
            assert needed and any(v in str(error) for v in needed), error
    for callback in (cfg.get("trainer") or {}).get("callbacks") or []:
        _load_class(callback["class_path"])(**(callback.get("init_args") or {}))
