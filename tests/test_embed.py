"""``ue embed``: a victim's features of clean and protected train digits on one t-SNE map, with their spread."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch

from conftest import REPO, cpu_trainer
from ue_lightning.cli import main
from ue_lightning.data import NoiseFile, NoiseMetadata, UEDataModule
from ue_lightning.embed import spread
from ue_lightning.modules import VictimClassifier

DATA = str(REPO / "configs/data/digits.yaml")  # the embedded digits, 8x8 grey


@pytest.fixture(scope="module")
def victim_and_noise(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(a ResNet-18 (width 4) fitted 30 steps, unaugmented, on digits protected by a class-wise noise of +-32/255 patterns, that
    noise file, an all-zero noise file)."""
    root = tmp_path_factory.mktemp("embed")
    train = UEDataModule("digits").clean_split("train")
    g = torch.Generator().manual_seed(0)
    patterns = (torch.randint(0, 2, (10, 1, 8, 8), generator=g) * 64 - 32).to(torch.int8)
    for name, delta in (("pattern", patterns), ("zero", torch.zeros_like(patterns))):
        NoiseFile.write(root / f"{name}.safetensors", delta,
                        NoiseMetadata(method=name, epsilon=32, classwise=True, fingerprint=train.fingerprint()))
    L.seed_everything(0)
    model = VictimClassifier(arch="resnet18", num_classes=10, in_channels=1, image_size=8, width=4, lr=0.05)
    trainer = cpu_trainer(root, max_steps=30)
    # no crop: a one-pixel shift would scramble the pixel pattern
    trainer.fit(model, UEDataModule("digits", batch_size=64, augment=False,
                                    perturbation=str(root / "pattern.safetensors")))
    trainer.save_checkpoint(root / "victim.ckpt")
    return root / "victim.ckpt", root / "pattern.safetensors", root / "zero.safetensors"


def test_embed_draws_each_data_and_measures_how_a_class_pattern_separates_the_classes(victim_and_noise, tmp_path):
    """A victim that learned the class pattern (the shortcut) sees its protected train images as tight, separate
    classes and their clean originals far less so. Bound: within / between on the protected images at most 0.7 of
    the clean images' (measured: 0.35 against 0.61); an all-zero noise file gives the clean spread exactly."""
    checkpoint, pattern, zero = victim_and_noise
    out = tmp_path / "fig" / "embedding.png"
    main(["embed", "--checkpoint", str(checkpoint), "--data", DATA, "--noise", f"[pattern={pattern}, zero={zero}]",
          "--output", str(out), "--per_class", "10"])
    report = json.loads(out.with_suffix(".json").read_text())
    assert out.stat().st_size > 10_000 and report["samples"] == 100
    assert list((out.with_suffix(".tensorboard")).glob("events.out.tfevents.*"))
    ratio = {name: s["ratio"] for name, s in report["spread"].items()}
    assert ratio["zero"] == pytest.approx(ratio["clean"], rel=1e-6)
    assert ratio["pattern"] < 0.7 * ratio["clean"], ratio


def test_spread_is_small_for_tight_separate_classes():
    labels = torch.arange(4).repeat_interleave(25)
    centres = torch.eye(4) * 10
    tight = centres[labels] + 0.1 * torch.randn(100, 4, generator=torch.Generator().manual_seed(0))
    mixed = torch.randn(100, 4, generator=torch.Generator().manual_seed(1))
    assert spread(tight, labels)["ratio"] < 0.01 < 1 < spread(mixed, labels)["ratio"] * 10


@pytest.mark.parametrize(("args", "message"), [
    (["--noise", "[nameonly]"], "give each noise file as name=path"),
    (["--noise", "[x=/nowhere/n.safetensors]"], "no file /nowhere/n.safetensors"),
    (["--data", "/nowhere.yaml"], "pass a data config"),
    (["--per_class", "0"], "--per_class 0 must be at least 1"),
    (["--perplexity", "0"], "--perplexity 0.0 must be positive"),
])
def test_bad_embed_input_is_refused_in_one_line(victim_and_noise, tmp_path, capsys, args, message):
    checkpoint, _, _ = victim_and_noise
    base = {"--checkpoint": str(checkpoint), "--data": DATA, "--output": str(tmp_path / "e.png")}
    base.update(dict(zip(args[::2], args[1::2])))
    with pytest.raises(SystemExit):
        main(["embed", *[a for kv in base.items() for a in kv]])
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and not (tmp_path / "e.png").exists(), err
