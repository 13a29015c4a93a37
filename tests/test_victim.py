"""VictimClassifier through the `ue` CLI: fit and test, standard and adversarial, one process and DDP."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, config_args, run_ue, shipped
from ue_lightning.modules import VictimClassifier

TINY = ["--config", str(REPO / "configs/victim/digits.yaml"), "--model.init_args.width", "4",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--data.train_subset", "300", "--data.resize", "8"]  # the 8x8 digits: 4 epochs learn them


def test_accuracy(stdout: str, name: str = "test/acc") -> float:
    match = re.search(rf"{re.escape(name)}\s+([0-9.]+)", stdout)
    assert match, f"no {name} in the output:\n{stdout[-2000:]}"
    return float(match.group(1))


test_accuracy.__test__ = False  # a helper, not a test


def _fit(tmp_path: Path, *extra: str) -> Path:
    run_ue("fit", *TINY, "--trainer.default_root_dir", str(tmp_path), *extra)
    ckpts = sorted(tmp_path.glob("lightning_logs/version_*/checkpoints/last.ckpt"))
    assert ckpts, "fit wrote no checkpoint"
    return ckpts[-1]


def test_standard_fit_then_test_from_checkpoint(tmp_path):
    ckpt = _fit(tmp_path, "--trainer.max_epochs", "4")
    out = run_ue("test", *TINY, "--ckpt_path", str(ckpt), "--trainer.default_root_dir", str(tmp_path)).stdout
    assert test_accuracy(out) > 0.3  # chance is 0.1; 4 epochs of 300 digits reach far more


def test_adversarial_fit_reports_robust_accuracy(tmp_path):
    ckpt = _fit(tmp_path, "--trainer.max_epochs", "1", "--model.init_args.adv_radius", "4",
                "--model.init_args.adv_steps", "2", "--model.init_args.robust_eval", "true")
    model = VictimClassifier.load_from_checkpoint(ckpt)
    assert model.adv_radius_px == pytest.approx(4 / 255) and model.adv_step_size_px == pytest.approx(1 / 255)
    out = run_ue("test", *TINY, "--ckpt_path", str(ckpt), "--model.init_args.adv_radius", "4",
                 "--model.init_args.adv_steps", "2", "--model.init_args.robust_eval", "true",
                 "--trainer.default_root_dir", str(tmp_path)).stdout
    clean, robust = test_accuracy(out), test_accuracy(out, "test/robust_acc")
    assert 0 <= robust <= clean


def test_adversarial_training_step_uses_perturbed_inputs():
    torch.manual_seed(0)
    model = VictimClassifier(arch="resnet18", num_classes=10, in_channels=1, image_size=8, width=4, adv_radius=8,
                             adv_steps=3)
    x, y = torch.rand(6, 1, 8, 8), torch.arange(6)
    adv = model.adversarial(x, y)
    assert (adv - x).abs().max() <= 8 / 255 + 1e-6 and (adv - x).abs().max() > 4 / 255
    assert model.model.training  # the attack restored the train mode
    assert all(p.grad is None for p in model.parameters())


def test_bad_radius_is_refused():
    with pytest.raises(ValueError, match="1/255 units"):
        VictimClassifier(num_classes=10, adv_radius=0.0314)


@pytest.mark.slow
def test_ddp_fit_checkpoint_evaluates_the_same_in_one_and_two_processes(tmp_path):
    ddp = ["--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp"]
    ckpt = _fit(tmp_path, "--trainer.max_epochs", "8", *ddp)
    one = test_accuracy(run_ue("test", *TINY, "--ckpt_path", str(ckpt), "--trainer.default_root_dir",
                               str(tmp_path)).stdout)
    two = test_accuracy(run_ue("test", *TINY, "--ckpt_path", str(ckpt), "--trainer.default_root_dir",
                               str(tmp_path), *ddp).stdout)
    assert one == pytest.approx(two, abs=1e-6)  # 450 test digits split evenly: no padded duplicates
    assert one > 0.15


@pytest.mark.parametrize("url", ["http://127.0.0.1:9/last.ckpt", "https://example.invalid/x.ckpt", "s3://b/x.ckpt"])
def test_a_checkpoint_url_is_refused_before_anything_is_fetched(url, monkeypatch):
    import ue_lightning.cli as cli

    fetched = []
    monkeypatch.setattr("lightning.fabric.utilities.cloud_io._load", lambda *a, **k: fetched.append(a))
    with pytest.raises(ValueError, match="local path"):
        cli.build_cli(["test", *TINY, "--ckpt_path", url])
    assert not fetched


def test_ue_predict_keeps_no_predictions_in_memory(monkeypatch, tmp_path):
    import lightning as L

    import ue_lightning.cli as cli

    seen = {}
    monkeypatch.setattr(L.Trainer, "predict", lambda self, **kw: seen.update(kw))
    cli.build_cli(["predict", *config_args(*shipped("digits", "generator/random")),
                   "--trainer.callbacks.output", str(tmp_path / "n.safetensors")])
    assert seen["return_predictions"] is False


@pytest.mark.parametrize("args, says", [
    (["fit", *TINY, "--model.init_args.adv_radius", "100"], "adv_radius=100 is out of range"),
    (["fit", *TINY, "--data.dataset", "npz", "--data.root", "/nonexistent/x.npz", "--data.resize", "null"],
     "/nonexistent/x.npz"),
    (["export", "--noise", "/nonexistent/n.safetensors", "--dataset", "digits", "--output", "/tmp/ue-never"],
     "n.safetensors"),
])
def test_user_errors_print_one_message_and_exit_2(args, says):
    proc = subprocess.run([sys.executable, "-m", "ue_lightning.cli", *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("ue: error:")]
    assert len(errors) == 1 and says in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


@pytest.fixture(scope="module")
def victim_checkpoint(tmp_path_factory) -> Path:
    """A VictimClassifier checkpoint made by `ue fit` (the CLI records the module's class path in it)."""
    root = tmp_path_factory.mktemp("victim")
    run_ue("fit", *TINY, "--trainer.max_steps", "1", "--trainer.limit_val_batches", "0",
           "--trainer.default_root_dir", str(root))
    return sorted(root.glob("lightning_logs/version_*/checkpoints/last.ckpt"))[-1]


def _parse_only(monkeypatch, *args: str):
    import ue_lightning.cli as cli

    monkeypatch.setattr(cli.UECLI, "_run_subcommand", lambda self, subcommand: None)
    return cli.build_cli(list(args))


def test_a_checkpoint_of_another_module_is_refused(monkeypatch, victim_checkpoint):
    with pytest.raises(ValueError, match="holds a VictimClassifier, but the config's model is a RandomNoise"):
        _parse_only(monkeypatch, "predict", *config_args(*shipped("digits", "generator/random")),
                    "--data.resize", "8", "--ckpt_path", str(victim_checkpoint))


def test_settings_the_checkpoint_overrides_are_named_with_both_values(monkeypatch, victim_checkpoint):
    with pytest.warns(UserWarning, match=r"adv_radius: 4.0 \(config\) -> 0.0 \(checkpoint\)"):
        cli = _parse_only(monkeypatch, "test", *TINY, "--model.init_args.adv_radius", "4",
                          "--ckpt_path", str(victim_checkpoint))
    assert cli.model.hparams.adv_radius == 0.0  # what the checkpoint holds, as the warning says
