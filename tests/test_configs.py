"""Every shipped composition parses through the package's LightningCLI and instantiates what it names.

As ``ue fit`` would: ``build_cli`` (in process, ``run=False``) merges the composition's configs, fills the
run names (``{method}``, ``{data}``), validates every option and value, and instantiates the DataModule,
the model and the trainer with its callbacks. Nothing is read or trained: the data facts the CLI links into
the model (classes, channels, size) come from the datasets' known shapes, and TAP's frozen classifier
(a fitted checkpoint it needs first) is stood in for, after checking the config names the one its header
says to train. So configs of datasets absent here (CIFAR, the ImageNet subset) are checked too, and a
renamed option, a bad value or an out-of-range budget fails here, not an hour into a user's run.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint

from conftest import REPO, shipped
from ue_lightning.callbacks import PerturbationWriter
from ue_lightning.cli import build_cli
from ue_lightning.compose import run_names
from ue_lightning.data import UEDataModule
from ue_lightning.modules.baselines import tap

CONFIGS = REPO / "configs"
#: Methods whose config builds on another's: data collapse is REM's loop plus the score step; TUE's MoCo and
#: SimSiam forms are the SimCLR demo's loop with another backbone.
BUILDS_ON = {"collapse": ("generator/rem",), "tue-moco": ("generator/tue",), "tue-simsiam": ("generator/tue",)}


def _generators() -> list[list[str]]:
    """Each generator method on each data with overlays (and CIFAR-10, the method files' own), and each variant
    overlay (an overlay with no method file of its name, e.g. rem-rho2) on its own data."""
    methods = sorted(p.stem for p in (CONFIGS / "generator").glob("*.yaml"))
    overlays = sorted((CONFIGS / "generator").glob("*/*.yaml"))
    datasets = sorted({p.parent.name for p in overlays} | {"cifar10"})
    out = [shipped(data, *BUILDS_ON.get(m, ()), f"generator/{m}") for m in methods for data in datasets]
    for variant in (p for p in overlays if p.stem not in methods):
        base = max((m for m in methods if variant.stem.startswith(m + "-")), key=len)
        data = variant.parent.name
        out.append(shipped(data, *BUILDS_ON.get(base, ()), f"generator/{base}", f"generator/{data}/{variant.stem}"))
    return out


def _victims() -> list[list[str]]:
    """Each victim config: alone when it names its dataset, else on the data its scale is for."""
    out = []
    for victim in sorted((CONFIGS / "victim").glob("*.yaml")):
        if "dataset" in ((yaml.safe_load(victim.read_text()) or {}).get("data") or {}):
            out.append([str(victim)])
        else:
            out.append([str(CONFIGS / "data" / ("cifar10-npz-cpu.yaml" if victim.stem.endswith("-cpu")
                                                 else "cifar10.yaml")), str(victim)])
    # the stand-in for the ImageNet-subset path (benchmarks/RESULTS.md, "ue protect on real photos")
    out.append([str(CONFIGS / "data/tiny-imagenet-10.yaml"), str(CONFIGS / "victim/resnet18-cpu.yaml")])
    out.append([str(CONFIGS / "data/tiny-imagenet-10-cpu.yaml"), str(CONFIGS / "victim/airbench-cpu.yaml")])  # cpu-table1 (ImageNet-subset row)
    out.append([str(CONFIGS / "data/svhn.yaml"), str(CONFIGS / "victim/mobilenet_v2.yaml")])  # APBench's data and victim
    return out


GENERATORS = _generators()
SCORES = [shipped(data, "score/dsm") for data in sorted({p.parent.name for p in CONFIGS.glob("score/*/*.yaml")}
                                                        | {"cifar10", "cifar100"})]
COMPOSITIONS = GENERATORS + SCORES + _victims()


def _id(configs: list[str]) -> str:
    return " + ".join(str(Path(c).relative_to(CONFIGS)).removesuffix(".yaml") for c in configs)


def _data_facts(self: UEDataModule, split: str) -> SimpleNamespace:
    """What the CLI's links read from the train split (classes, image shape), from the datasets' known shapes."""
    size = {"imagenet_subset": self.resize or 256, "folder": self.resize or 256, "digits": self.resize or 8}
    classes = {"cifar100": 100, "imagenet_subset": self.max_classes or 100, "folder": self.max_classes or 10}
    side = size.get(self.dataset, 32)
    return SimpleNamespace(num_classes=classes.get(self.dataset, 10),
                           image_shape=(1 if self.dataset == "digits" else 3, side, side))


@pytest.fixture
def nothing_read(tmp_path, monkeypatch) -> list[str]:
    """No data read, nothing written to the repository; returns the classifier checkpoints TAP asked for."""
    monkeypatch.chdir(tmp_path)  # the trainer's loggers and every relative path land here
    monkeypatch.setattr(UEDataModule, "clean_split", _data_facts)
    asked: list[str] = []
    monkeypatch.setattr(tap, "load_victim_classifier",
                        lambda path, *args, **kwargs: asked.append(str(path)) or torch.nn.Identity())
    return asked


def _cli(configs: list[str], *args: str):
    return build_cli([a for c in configs for a in ("--config", c)] + list(args), run=False)


def test_every_config_file_is_in_a_composition():
    used = {Path(c) for composition in COMPOSITIONS for c in composition}
    assert sorted(set(CONFIGS.rglob("*.yaml")) - used) == []
    assert len(GENERATORS) >= 40 and len(SCORES) == 5


@pytest.mark.parametrize("configs", COMPOSITIONS, ids=[_id(c) for c in COMPOSITIONS])
def test_composition_instantiates(configs: list[str], nothing_read: list[str]):
    cli = _cli(configs)
    assert isinstance(cli.datamodule, UEDataModule) and isinstance(cli.model, L.LightningModule)
    settings = str({key: cli.config.as_dict()[key] for key in ("model", "data", "trainer")})
    assert "{data}" not in settings and "{method}" not in settings  # every run name filled
    names = run_names(configs)
    kinds = {part for c in configs for part in Path(c).relative_to(CONFIGS).parts[:1]}
    callbacks = {type(c): c for c in cli.trainer.callbacks}
    if "generator" in kinds:  # output paths distinct per method and data, none typed
        run = f"{names['method']}-{names['data']}"
        assert str(callbacks[PerturbationWriter].output) == f"runs/noise/{run}.safetensors"
        if any(c.class_path.endswith(".ModelCheckpoint") for c in cli.config.trainer.callbacks):
            assert callbacks[ModelCheckpoint].dirpath.endswith(f"runs/generator/{run}/checkpoints")
    if "score" in kinds:
        assert callbacks[ModelCheckpoint].dirpath.endswith(f"runs/score/{names['data']}/checkpoints")
    if nothing_read:  # TAP: the classifier its header says to train on this data
        assert nothing_read == [f"runs/victim/clean-{names['data']}/checkpoints/last.ckpt"]


def test_tap_needs_its_fitted_classifier_and_names_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(UEDataModule, "clean_split", _data_facts)
    with pytest.raises(ValueError, match="classifier_checkpoint runs/victim/clean-cifar10/checkpoints/last.ckpt does "
                                         "not exist: train one"):  # jsonargparse wraps the FileNotFoundError
        _cli(shipped("cifar10", "generator/tap"))


@pytest.mark.parametrize("args, error", [
    (["--model.init_args.stepsize", "1"], SystemExit),  # jsonargparse: not an option (a renamed one)
    (["--model.init_args.epsilon", "1000"], ValueError),  # the module: out of range
    (["--data.dataset", "cifar11"], ValueError),  # the DataModule: not a dataset
], ids=["renamed", "out-of-range", "unknown-dataset"])
def test_a_renamed_option_or_a_bad_value_fails(args: list[str], error: type, nothing_read: list[str]):
    with pytest.raises(error):
        _cli(shipped("cifar100", "generator/em-samplewise"), *args)


def test_a_missing_overlay_is_named_and_a_given_path_kept(nothing_read: list[str]):
    with pytest.warns(UserWarning, match="cifar100/em-samplewise.yaml holds this method's settings"):
        cli = _cli(shipped("cifar100", "generator/em-samplewise")[:2], "--trainer.default_root_dir", "mine")
    assert cli.model.hparams.train_steps == 10 and cli.trainer.default_root_dir == "mine"


def test_a_run_name_no_config_gives_is_one_error_naming_each_setting(tmp_path, nothing_read: list[str]):
    data = tmp_path / "mine.yaml"  # a data config outside a `data` folder: no {data}
    data.write_text((CONFIGS / "data/cifar10.yaml").read_text())
    method = str(CONFIGS / "generator/rem.yaml")
    with pytest.raises(ValueError, match=r"the name: trainer\.callbacks\.init_args\.dirpath, "
                                         r"trainer\.callbacks\.init_args\.output, trainer\.default_root_dir\."):
        _cli([str(data), method])
    paths = tmp_path / "paths.yaml"  # the values given literally
    paths.write_text(yaml.safe_dump({"trainer": {"default_root_dir": "a", "callbacks": [
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"dirpath": "b"}},
        {"class_path": "ue_lightning.callbacks.PerturbationWriter", "init_args": {"output": "c.safetensors"}}]}}))
    cli = _cli([str(data), method, str(paths)])
    assert str(next(c for c in cli.trainer.callbacks if isinstance(c, PerturbationWriter)).output) == "c.safetensors"
