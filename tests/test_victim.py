"""VictimClassifier through the `ue` CLI: fit and test, standard and adversarial, one process and DDP."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from conftest import REPO, config_args, cpu_trainer, run_ue, shipped
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
def test_user_errors_print_one_message_and_exit_2(args, says, capsys, monkeypatch):
    import ue_lightning.cli as cli

    monkeypatch.delenv("UE_DEBUG", raising=False)  # `python -m ue_lightning.cli` runs cli.main: in process
    with pytest.raises(SystemExit) as stop:
        cli.main(args)
    err = capsys.readouterr().err
    assert stop.value.code == 2, err[-2000:]
    errors = [line for line in err.splitlines() if line.startswith("ue: error:")]
    assert len(errors) == 1 and says in errors[0], err[-2000:]
    assert "Traceback" not in err


def test_the_entry_point_exits_2_with_the_one_line(tmp_path):
    """`python -m ue_lightning.cli`, as a user runs it (the cases above call cli.main in process)."""
    proc = subprocess.run([sys.executable, "-m", "ue_lightning.cli", "fit", *TINY, "--model.init_args.adv_radius", "100"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.splitlines()[-1].startswith("ue: error: adv_radius=100 is out of range"), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("mistake, says", [
    (["--trainer.max_stepz", "3"], "unknown option --trainer.max_stepz: did you mean --trainer.max_steps?"),
    (["--trainer.max_steps", "abc"], "--trainer.max_steps abc: expected int; give one"),
    (["--model.init_args.widht", "3"], "unknown option --model.init_args.widht: did you mean --model.init_args.width?"),
    (["--config", "nope.yaml"], "nope.yaml: no such file; check the path"),
], ids=["option-typo", "bad-value", "nested-option-typo", "missing-config"])
def test_a_refused_command_line_is_one_line_naming_the_fix_without_the_usage(mistake, says, capsys):
    import ue_lightning.cli as cli

    with pytest.raises(SystemExit) as stop:  # jsonargparse printed the 60-line usage before its message
        cli.main(["fit", *TINY, *mistake])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and len(err.rstrip("\n").splitlines()) == 1, err
    assert err.startswith("ue: error: ") and says in err, err


@pytest.mark.parametrize("command", ["bogus", "fitt"])
def test_an_unknown_command_is_one_line_naming_every_command(command, capsys):
    import ue_lightning.cli as cli

    with pytest.raises(SystemExit) as stop:  # LightningCLI listed only its own four subcommands
        cli.main([command, "--config", "x.yaml"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and len(err.rstrip("\n").splitlines()) == 1, err
    assert f"unknown command '{command}'" in err and all(c in err for c in ("fit", "protect", "grid", "pipeline")), err


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


class _RunsCode:
    """Unpickling this makes the folder ``path``: the probe that code ran while a checkpoint was loaded."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return os.makedirs, (str(self.path),)


def test_a_local_ckpt_path_starting_with_http_loads_the_local_file_and_never_torch_hub(
        monkeypatch, tmp_path, victim_checkpoint):
    import shutil

    import ue_lightning.cli as cli

    # Lightning sends every path starting with "http" to torch.hub, which loads a same-named cached file with pickle
    ran = tmp_path / "code-ran"
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    (tmp_path / "torch/hub/checkpoints").mkdir(parents=True)
    torch.save({"state_dict": _RunsCode(ran)}, tmp_path / "torch/hub/checkpoints/victim.ckpt")
    (tmp_path / "http_models").mkdir()
    shutil.copy(victim_checkpoint, tmp_path / "http_models/victim.ckpt")
    monkeypatch.chdir(tmp_path)
    run = cli.build_cli(["test", *TINY, "--ckpt_path", "http_models/victim.ckpt", "--trainer.logger", "false",
                         "--trainer.default_root_dir", str(tmp_path), "--trainer.limit_test_batches", "1"])
    assert not ran.exists()
    saved = torch.load(victim_checkpoint, weights_only=True)["state_dict"]
    for name, value in run.model.state_dict().items():  # the user's own weights were the ones tested
        torch.testing.assert_close(value, saved[name])
    with pytest.raises(FileNotFoundError, match="http_models/missing.ckpt"):
        cli.build_cli(["test", *TINY, "--ckpt_path", "http_models/missing.ckpt", "--trainer.logger", "false",
                       "--trainer.default_root_dir", str(tmp_path)])
    assert not ran.exists()


def test_a_checkpoint_that_would_run_code_is_refused_in_one_line(tmp_path, capsys):
    import ue_lightning.cli as cli

    ran = tmp_path / "code-ran"
    torch.save({"state_dict": _RunsCode(ran)}, tmp_path / "bad.ckpt")
    with pytest.raises(SystemExit) as stop:
        cli.main(["test", *TINY, "--ckpt_path", str(tmp_path / "bad.ckpt"), "--trainer.logger", "false"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and not ran.exists()
    errors = [line for line in err.splitlines() if line.startswith("ue: error:")]
    assert len(errors) == 1 and "bad.ckpt" in errors[0] and "not unpickled" in errors[0], err
    assert "weights_only=False" not in err and "Traceback" not in err  # torch's advice to run the code is not ours


def test_a_small_crafted_checkpoint_cannot_make_ue_test_build_a_huge_network(tmp_path, capsys):
    import ue_lightning.cli as cli
    from conftest import memory_cap

    crafted = tmp_path / "huge.ckpt"  # a VictimClassifier of width 20000 (a 14 GB ResNet-18), one tiny weight
    torch.save({"state_dict": {"model.fc.weight": torch.zeros(1)}, "hyper_parameters": {
        "_class_path": "ue_lightning.modules.VictimClassifier", "arch": "resnet18", "num_classes": 10,
        "in_channels": 1, "image_size": 8, "width": 20000}}, crafted)
    assert crafted.stat().st_size < 4096
    with memory_cap(1 << 30), pytest.raises(SystemExit) as stop:  # Lightning built it from the hyperparameters
        cli.main(["test", *TINY, "--ckpt_path", str(crafted), "--trainer.logger", "false"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and len(err.rstrip("\n").splitlines()) == 1, err
    assert err.startswith(f"ue: error: --ckpt_path {crafted}: weights do not fit a VictimClassifier"), err


def test_a_plain_fit_rerun_is_refused_with_the_option_that_resumes_and_last_ckpt_is_kept(tmp_path, capsys):
    import yaml

    import ue_lightning.cli as cli

    overlay = tmp_path / "checkpoints.yaml"  # the generator configs' kind: one folder, last.ckpt overwritten
    overlay.write_text(yaml.safe_dump({"trainer": {"callbacks": [{
        "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
        "init_args": {"dirpath": str(tmp_path / "ckpt"), "save_last": True, "enable_version_counter": False}}]}}))
    fit = ["fit", *TINY, "--config", str(overlay), "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0",
           "--trainer.logger", "false", "--trainer.default_root_dir", str(tmp_path)]
    cli.main(fit)  # then Ctrl-C, or a run that ended: the same command again
    last = tmp_path / "ckpt/last.ckpt"
    kept = last.read_bytes()
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:  # it started over at step 0 and overwrote last.ckpt
        cli.main(fit)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("ue: error:")]
    assert stop.value.code == 2 and last.read_bytes() == kept
    assert len(errors) == 1 and f"resume it with --ckpt_path {last}" in errors[0] and "--start_over true" in errors[0]
    cli.main([*fit, "--start_over", "true"])  # deliberately
    assert torch.load(last, weights_only=True)["global_step"] == 2 and last.read_bytes() != kept


def test_settings_the_checkpoint_overrides_are_named_with_both_values(monkeypatch, victim_checkpoint):
    with pytest.warns(UserWarning, match=r"adv_radius: 4.0 \(config\) -> 0.0 \(checkpoint\)"):
        cli = _parse_only(monkeypatch, "test", *TINY, "--model.init_args.adv_radius", "4",
                          "--ckpt_path", str(victim_checkpoint))
    assert cli.model.hparams.adv_radius == 0.0  # what the checkpoint holds, as the warning says


# ------------------------------------------------------------------ the fast victim's pieces


def test_label_smoothing_mixes_the_uniform_distribution_into_the_targets():
    logits, y = torch.randn(5, 10), torch.tensor([0, 3, 9, 1, 1])
    plain = VictimClassifier(arch="airbench", width=4, image_size=16)
    smooth = VictimClassifier(arch="airbench", width=4, image_size=16, label_smoothing=0.2)
    log_p = logits.log_softmax(1)
    nll = -log_p.gather(1, y[:, None]).mean()
    torch.testing.assert_close(plain.loss(logits, y), nll)
    torch.testing.assert_close(smooth.loss(logits, y), 0.8 * nll + 0.2 * -log_p.mean())
    soft = torch.nn.functional.one_hot(y, 10).float()  # mixup's soft targets get the same smoothing
    torch.testing.assert_close(smooth.loss(logits, soft), smooth.loss(logits, y))
    with pytest.raises(ValueError, match="label_smoothing"):
        VictimClassifier(label_smoothing=1.0)


@pytest.mark.parametrize("tta", [False, True])
def test_flip_tta_averages_the_logits_of_the_image_and_its_mirror(tta, monkeypatch):
    torch.manual_seed(0)
    model = VictimClassifier(arch="airbench", width=4, image_size=16, tta_flip=tta).eval()
    monkeypatch.setattr(model, "log", lambda *args, **kwargs: None)  # no trainer here
    x = torch.rand(6, 3, 16, 16)
    with torch.no_grad():
        plain, mirrored = model(x), model(x.flip(-1))
        expected = (plain + mirrored) / 2 if tta else plain
        torch.testing.assert_close(model.eval_logits(x), expected)
        assert not torch.allclose(plain, mirrored)  # the mirror does change the logits
        model.test_step((x, expected.argmax(1), torch.arange(6)), 0)
    assert model.test_acc.compute() == 1.0  # test_step scores the averaged logits


def test_triangular_schedule_and_nesterov():
    from ue_lightning.modules.optim import optimizer_with_schedule

    params = [torch.nn.Parameter(torch.zeros(1))]
    conf = optimizer_with_schedule(params, 10, lr=1.0, schedule="triangular", warmup=0.2, nesterov=True)
    optimizer, scheduler = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    assert optimizer.defaults["nesterov"]
    rates = []
    for _ in range(10):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates == pytest.approx([1 / 3, 2 / 3, 1.0, 7 / 8, 6 / 8, 5 / 8, 4 / 8, 3 / 8, 2 / 8, 1 / 8])
    with pytest.raises(ValueError, match="warmup"):
        optimizer_with_schedule(params, 10, lr=1.0, schedule="triangular", warmup=1.5)


def test_adamw_for_the_vit_victim():
    from ue_lightning.modules.optim import optimizer_with_schedule

    params = [torch.nn.Parameter(torch.zeros(1))]
    conf = optimizer_with_schedule(params, 10, lr=1e-3, optimizer="adamw", weight_decay=0.05)
    assert isinstance(conf["optimizer"], torch.optim.AdamW) and conf["optimizer"].defaults["weight_decay"] == 0.05
    with pytest.raises(ValueError, match="choose sgd or adamw"):
        optimizer_with_schedule(params, 10, lr=1e-3, optimizer="adam")


class _WhiteningAtFirstStep(L.Callback):
    """Records the whitening filters the first optimiser step sees, and the last one."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        weight = pl_module.model.backbone.whiten.conv.weight.detach().clone()
        self.first = getattr(self, "first", weight)
        self.last = weight


def _tiny_trainer(tmp_path: Path, callback: L.Callback, **kwargs) -> L.Trainer:
    return cpu_trainer(tmp_path, inference_mode=True, num_sanity_val_steps=0, callbacks=[callback], **kwargs)


def test_airbench_victim_fits_whitened_from_its_train_batches(fake_npz, tmp_path):
    from ue_lightning.data import UEDataModule

    torch.manual_seed(0)
    data = UEDataModule(dataset="npz", root=str(fake_npz), batch_size=16)
    model = VictimClassifier(arch="airbench", width=4, in_channels=3, image_size=16, lr=0.2, nesterov=True,
                             schedule="triangular", label_smoothing=0.2, tta_flip=True)
    whiten = model.model.backbone.whiten
    untouched = whiten.conv.weight.detach().clone()
    seen = _WhiteningAtFirstStep()
    trainer = _tiny_trainer(tmp_path, seen, max_epochs=2)
    trainer.fit(model, datamodule=data)
    assert whiten.fitted and not torch.allclose(seen.first, untouched)  # set from data before the first step
    torch.testing.assert_close(whiten.conv.weight, seen.first)  # and frozen from then on
    torch.testing.assert_close(seen.last, seen.first)
    assert 0.0 <= trainer.test(model, datamodule=data, verbose=False)[0]["test/acc"] <= 1.0

    fitted = whiten.conv.weight.detach().clone()  # a second fit (a resumed one) keeps the fitted layer
    _tiny_trainer(tmp_path, _WhiteningAtFirstStep(), max_steps=1).fit(model, datamodule=data)
    torch.testing.assert_close(whiten.conv.weight, fitted)

    unfitted = VictimClassifier(arch="airbench", width=4, in_channels=3, image_size=16, fit_whitening=False)
    _tiny_trainer(tmp_path, _WhiteningAtFirstStep(), max_steps=1).fit(unfitted, datamodule=data)
    torch.testing.assert_close(unfitted.model.backbone.whiten.conv.weight, untouched)
    assert not unfitted.model.backbone.whiten.fitted
