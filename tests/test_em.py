"""ErrorMinimizingNoise (Huang et al., ICLR 2021): stop rule, round cap, checkpoint/resume, DDP, noise files.

Everything runs on the embedded digits (8x8 greyscale) with ResNet-18 at width 4, on one
CPU thread (several engineers share two cores: OpenMP threads spinning against each other
make a 2-thread run ~20x slower than a 1-thread one).
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import yaml

from tests.conftest import config_args, run_ue, shipped
from conftest import cpu_trainer
from ue_lightning.callbacks import PerturbationWriter
from ue_lightning.data import UEDataModule
from ue_lightning.data.noise_file import NoiseFile, quantize_delta
from ue_lightning.modules import ErrorMinimizingNoise
from ue_lightning.modules.em import CHECKPOINT_KEY
from ue_lightning.ops.shard_duplicates import first_unseen

ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def digits(train_subset: int = 20, batch_size: int = 8, eval_batch_size: int = 16, **kw) -> UEDataModule:
    return UEDataModule("digits", batch_size=batch_size, eval_batch_size=eval_batch_size, train_subset=train_subset,
                        augment=False, **kw)


def em(mode: str = "samplewise", **kw) -> ErrorMinimizingNoise:
    args = dict(arch="resnet18", width=4, in_channels=1, image_size=8, num_classes=10, mode=mode,
                eot_padding=1, eot_flip=False)  # the digits' own augmentation
    return ErrorMinimizingNoise(**{**args, **kw})


def trainer(root: Path | None = None, **kw) -> L.Trainer:
    return cpu_trainer(root, **{"max_epochs": -1, **kw})


def write_noise(module: ErrorMinimizingNoise, dm: UEDataModule, output: Path, **writer) -> NoiseFile:
    trainer(callbacks=[PerturbationWriter(str(output), **writer)]).predict(module, datamodule=dm,
                                                                          return_predictions=False)
    return NoiseFile.open(output)


FITTED = dict(train_steps=3, max_rounds=2, steps=10, classwise_subset=0.5)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory) -> dict[str, Path]:
    """A checkpoint per mode after 2 rounds of 3 surrogate steps and 10 PGD steps (40 digits, batches of 8)."""
    root = tmp_path_factory.mktemp("em")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    out = {}
    for mode in ("samplewise", "classwise"):
        module = em(mode, **FITTED)
        t = trainer()
        t.fit(module, datamodule=digits(train_subset=40))
        out[mode] = root / f"{mode}.ckpt"
        t.save_checkpoint(out[mode])
    torch.set_num_threads(before)
    return out


# ---------------------------------------------------------------------------------- the loop
class _Rounds(L.Callback):
    """Records (surrogate_accuracy, pass_accuracy, stopped) after every training batch that ended a round."""

    def __init__(self):
        self.seen = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        row = (module.rounds, module.surrogate_accuracy, module.pass_accuracy, module.stopped)
        if not self.seen or self.seen[-1] != row:
            self.seen.append(row)


def test_stop_rule_fires_once_the_surrogate_has_learned_the_noise():
    """20 digits: the surrogate's train-mode accuracy on its perturbed batches reaches 90% before the cap."""
    module = em(train_steps=10, max_rounds=15, steps=20, stop_accuracy=0.9, surrogate_augment=False)
    t = trainer()
    t.fit(module, datamodule=digits(train_subset=20, batch_size=10))  # 2 batches per epoch
    assert module.stopped and t.should_stop
    assert module.surrogate_accuracy >= 0.9
    assert 1 <= module.rounds < 15
    # the 10-step counter runs across epoch boundaries (2 batches each); the stop comes after a round's
    # SGD steps and before its pass, so the noise kept is the one the surrogate learned
    assert module.surrogate_steps == 10 * (module.rounds + 1)
    assert t.current_epoch >= 3
    assert module.noise.abs().max() <= module.radius_px + 1e-6
    assert module.noise.abs().max() > 0.5 * module.radius_px


def test_stop_rule_waits_while_the_surrogate_has_not_learned_the_noise(monkeypatch):
    """The frozen surrogate classifies its freshly fitted noise perfectly (as on CIFAR after 2-3 rounds,
    benchmarks/RESULTS.md) while in train mode it is far from 99% on the batches it trains on: the
    default rule keeps going (here to the round cap), the reference rule stops after one pass."""
    monkeypatch.setattr(ErrorMinimizingNoise, "_samplewise_pass", lambda self: 1.0)  # PGD fooled the frozen model
    rounds = _Rounds()
    module = em(train_steps=3, max_rounds=4, steps=1)
    trainer(callbacks=[rounds]).fit(module, datamodule=digits(train_subset=200, batch_size=32))
    assert module.rounds == 4 and module.stopped  # by the cap
    assert not any(acc >= 0.99 for _, acc, _, _ in rounds.seen), rounds.seen
    assert module.pass_accuracy == 1.0

    reference = em(train_steps=3, max_rounds=4, steps=1, stop_on="noise_pass")
    trainer().fit(reference, datamodule=digits(train_subset=200, batch_size=32))
    assert reference.rounds == 1 and reference.stopped


def test_stop_reason_reads_the_chosen_accuracy():
    module = em(max_rounds=10)
    module.rounds, module.surrogate_accuracy, module.pass_accuracy = 2, 0.3, 1.0
    assert module._stop_reason() is None
    module.surrogate_accuracy = 0.995
    assert "surrogate accuracy" in module._stop_reason()
    module.rounds = 0  # no noise yet: a surrogate that fits clean data is no reason to stop
    assert module._stop_reason() is None
    reference = em(max_rounds=10, stop_on="noise_pass")
    reference.rounds, reference.surrogate_accuracy, reference.pass_accuracy = 2, 0.3, 1.0
    assert "noise_pass accuracy" in reference._stop_reason()
    with pytest.raises(ValueError, match="stop_on"):
        em(stop_on="eval")
    with pytest.raises(ValueError, match="pass_mode"):
        em(pass_mode="inference")


def test_train_mode_pass_leaves_the_surrogate_unchanged():
    """pass_mode=train: BatchNorm uses batch statistics in the pass but its running statistics stay put."""
    module = em(train_steps=0, max_rounds=1, steps=2, pass_mode="train")
    before = {k: v.clone() for k, v in module.model.state_dict().items()}
    trainer().fit(module, datamodule=digits(train_subset=20))
    assert module.rounds == 1 and module.noise.abs().max() > 0
    assert all(torch.equal(before[k], v) for k, v in module.model.state_dict().items())
    assert module.model.training  # its mode is restored after the pass


def test_classwise_pass_moves_every_class_at_nearly_every_batch():
    """The class-wise subset is shuffled each round: with batches of 16 over 80 samples (8 per class),
    each class's noise moves in most of the 5 batches, not once per pass as in a class-sorted order."""
    module = em("classwise", train_steps=0, max_rounds=1, steps=1, classwise_subset=1.0, noise_batch_size=16)
    moves = torch.zeros(10)
    original = module._minimize

    def counting(x, y, index, init):
        moves.index_add_(0, y.unique(), torch.ones(len(y.unique())))
        return original(x, y, index, init)

    module._minimize = counting
    trainer().fit(module, datamodule=digits(train_subset=80))
    assert moves.sum() >= 30, moves  # class-sorted order gives 10-14 (each class in 1-2 batches)


@pytest.mark.parametrize("mode", ["samplewise", "classwise"])
def test_round_cap_holds_on_an_impossible_target(mode):
    module = em(mode, train_steps=3, max_rounds=2, steps=2, stop_accuracy=1.01)
    t = trainer()
    t.fit(module, datamodule=digits(train_subset=30))
    assert module.rounds == 2 and module.surrogate_steps == 6 and t.global_step == 6
    assert module.pass_accuracy <= 1.0
    assert module.noise.shape == ((10, 1, 8, 8) if mode == "classwise" else (1347, 1, 8, 8))


def test_zero_train_steps_runs_a_pass_per_batch_with_a_fixed_surrogate():
    module = em(train_steps=0, max_rounds=3, steps=2)
    before = {k: v.clone() for k, v in module.model.state_dict().items()}
    t = trainer()
    t.fit(module, datamodule=digits(train_subset=20))
    assert module.rounds == 3 and module.surrogate_steps == 0 and t.global_step == 0
    after = module.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN running stats untouched too (eval mode)


def test_noise_pass_only_touches_the_train_subset_and_stays_in_budget(fitted):
    module = ErrorMinimizingNoise.load_from_checkpoint(fitted["samplewise"])
    dm = digits(train_subset=40)
    dm.setup("fit")
    used = torch.zeros(dm.num_train_samples, dtype=torch.bool)
    used[dm.train_indices()] = True
    moved = module.noise.flatten(1).abs().amax(1) > 0
    assert moved[used].all() and not moved[~used].any()
    assert torch.equal(module.covered, used)
    assert module.noise.abs().max() <= module.radius_px + 1e-6


# ---------------------------------------------------------------------------------- checkpoints
class _NoiseAtStart(L.Callback):
    def on_train_start(self, trainer, module):
        self.noise, self.rounds, self.steps = module.noise.clone(), module.rounds, module.surrogate_steps


@pytest.mark.parametrize("mode", ["samplewise", "classwise"])
def test_noise_survives_save_and_resume(fitted, mode):
    saved = torch.load(fitted[mode], weights_only=False)[CHECKPOINT_KEY]
    assert saved["rounds"] == 2 and saved["noise"].abs().max() > 0

    restored = ErrorMinimizingNoise.load_from_checkpoint(fitted[mode])
    assert torch.equal(restored.noise, saved["noise"]) and restored.rounds == 2

    module = em(mode, **{**FITTED, "max_rounds": 3})
    probe = _NoiseAtStart()
    t = trainer(callbacks=[probe])
    t.fit(module, datamodule=digits(train_subset=40), ckpt_path=fitted[mode])
    assert torch.equal(probe.noise, saved["noise"]) and probe.rounds == 2 and probe.steps == 6
    assert module.rounds == 3 and module.surrogate_steps == 9  # training continued for one more round
    assert not torch.equal(module.noise, saved["noise"])


def test_resume_after_the_stop_does_nothing(fitted):
    module = em(**FITTED)
    t = trainer()
    t.fit(module, datamodule=digits(train_subset=40), ckpt_path=fitted["samplewise"])
    assert module.rounds == 2 and module.surrogate_steps == 6


def test_wrong_checkpoints_and_settings_are_refused(fitted, tmp_path):
    with pytest.raises(ValueError, match="mode: samplewise"):
        trainer().fit(em("classwise", max_rounds=3), datamodule=digits(train_subset=40), ckpt_path=fitted["samplewise"])
    with pytest.raises(ValueError, match="fitted on other data"):
        _other_data(fitted)
    with pytest.raises(RuntimeError, match="--ckpt_path"):
        write_noise(em(), digits(), tmp_path / "zero.safetensors")
    with pytest.raises(ValueError, match="same data.train_subset"):  # fitted on 40 samples, asked for 60
        write_noise(ErrorMinimizingNoise.load_from_checkpoint(fitted["samplewise"]), digits(train_subset=60),
                    tmp_path / "more.safetensors")
    with pytest.raises(ValueError, match="augment: false"):
        trainer().fit(em(max_rounds=1), datamodule=UEDataModule("digits", batch_size=8, augment=True))
    victim_ckpt = tmp_path / "not_em.ckpt"
    torch.save({"state_dict": {}, "pytorch-lightning_version": L.__version__, "hyper_parameters": {}}, victim_ckpt)
    with pytest.raises(ValueError, match="holds no error-minimising noise"):
        trainer().fit(em(max_rounds=1), datamodule=digits(), ckpt_path=victim_ckpt)
    with pytest.raises(ValueError, match="1/255 units"):
        em(step_size=0.003)


def _other_data(fitted) -> None:
    """A checkpoint whose data fingerprint (labels hash) is not the digits': restoring it must fail."""
    ckpt = torch.load(fitted["samplewise"], weights_only=False)
    ckpt[CHECKPOINT_KEY]["fingerprint"]["labels_sha256"] = "0" * 64
    module = em(max_rounds=3)
    module.on_load_checkpoint(ckpt)
    trainer().fit(module, datamodule=digits(train_subset=40))


# ---------------------------------------------------------------------------------- noise files
def test_the_writer_assembles_in_chunks_the_same_file(fitted, tmp_path):
    module = ErrorMinimizingNoise.load_from_checkpoint(fitted["samplewise"])
    whole = write_noise(module, digits(train_subset=40), tmp_path / "whole.safetensors")
    chunked = write_noise(module, digits(train_subset=40), tmp_path / "chunked.safetensors", chunk_rows=3)
    assert np.array_equal(np.asarray(whole.delta), np.asarray(chunked.delta))
    assert np.array_equal(np.asarray(whole.covered), np.asarray(chunked.covered))
    assert np.asarray(whole.covered).sum() == 40 and np.abs(np.asarray(whole.delta)).max() > 0


def test_samplewise_file_is_the_stored_noise_within_budget(fitted, tmp_path):
    module = ErrorMinimizingNoise.load_from_checkpoint(fitted["samplewise"])
    dm = digits(train_subset=40)
    noise = write_noise(module, dm, tmp_path / "sw.safetensors")
    assert noise.metadata.method == "em-samplewise" and not noise.classwise and noise.metadata.epsilon == 8
    assert noise.max_abs() <= 8 and noise.max_abs() >= 7
    covered = torch.as_tensor(np.asarray(noise.covered)).bool()
    assert covered.sum() == 40 and torch.equal(covered.nonzero().flatten(), dm.train_indices())

    dm.setup("fit")
    clean = dm.clean_split("train")
    idx = dm.train_indices()
    clean_uint8 = clean.images[idx]
    file_delta = torch.from_numpy(np.asarray(noise.delta)[idx.numpy()])
    generated = module.generate(clean_uint8.float() / 255, clean.targets[idx], idx)
    assert torch.equal(file_delta, quantize_delta(clean_uint8, generated))  # each row is its own sample's
    unclipped = ((clean_uint8.float() + module.noise[idx] * 255) >= 0) & ((clean_uint8.float() + module.noise[idx] * 255) <= 255)
    assert (file_delta.float() - module.noise[idx] * 255)[unclipped].abs().max() <= 0.5 + 1e-4  # rounded

    protected = UEDataModule("digits", batch_size=64, train_subset=40, augment=False, perturbation=str(noise.path))
    protected.setup("fit")  # opens the file and checks its fingerprint against the data
    for i, pos in zip(idx.tolist(), range(len(idx))):
        x, _, index = protected.train_set[pos]
        assert index == i
        diff = (x * 255).round() - clean.images[i].float()
        assert torch.equal(diff, torch.from_numpy(np.asarray(noise.delta[i])).float())


def test_classwise_file_applies_its_class_delta_to_every_sample(fitted, tmp_path):
    module = ErrorMinimizingNoise.load_from_checkpoint(fitted["classwise"])
    noise = write_noise(module, digits(train_subset=40), tmp_path / "cw.safetensors")
    assert noise.classwise and noise.metadata.method == "em-classwise" and noise.delta.shape == (10, 1, 8, 8)
    assert noise.max_abs() <= 8 and noise.max_abs() >= 7
    delta = torch.from_numpy(np.asarray(noise.delta)).float()
    assert torch.equal(delta, (module.noise * 255).round())

    protected = UEDataModule("digits", batch_size=64, augment=False, perturbation=str(noise.path))
    protected.setup("fit")  # all 1347 samples get their class's noise (fraction 1.0)
    clean = protected.clean_split("train")
    x, y, index = next(iter(protected.train_dataloader()))
    protected_uint8 = (x * 255).round()
    clean_uint8 = clean.images[index].float()
    want = delta[y]
    unclipped = ((clean_uint8 + want) >= 0) & ((clean_uint8 + want) <= 255)
    assert unclipped.float().mean() > 0.3  # digits have many 0 pixels: negative noise is clipped there
    assert torch.equal((protected_uint8 - clean_uint8)[unclipped], want[unclipped])
    assert torch.equal(protected_uint8[~unclipped], (clean_uint8 + want).clamp(0, 255)[~unclipped])


def test_generate_is_projected_and_center_cropped():
    module = em(max_rounds=1)
    module.noise = torch.full((4, 1, 8, 8), 8 / 255)
    x = torch.ones(4, 1, 6, 6) * torch.tensor([0.0, 0.5, 0.99, 1.0]).view(4, 1, 1, 1)
    delta = module.generate(x, torch.zeros(4, dtype=torch.long), torch.arange(4))
    assert delta.shape == x.shape and ((x + delta) <= 1).all() and (delta >= 0).all()
    assert torch.allclose(delta[:2], torch.full_like(delta[:2], 8 / 255))
    module.noise = torch.arange(16.0).view(1, 1, 4, 4) / 4 / 255  # 4x4 noise (< 4/255) for a 2x2 crop
    delta = module.generate(torch.full((1, 1, 2, 2), 0.5), torch.zeros(1, dtype=torch.long), torch.zeros(1).long())
    assert torch.allclose(delta * 255 * 4, torch.tensor([[[[5.0, 6.0], [9.0, 10.0]]]]))


def test_first_unseen_keeps_each_index_once_per_pass():
    seen = torch.zeros(6, dtype=torch.bool)
    assert first_unseen(torch.tensor([3, 1, 3, 4]), seen).tolist() == [True, True, False, True]
    assert first_unseen(torch.tensor([5, 1, 0]), seen).tolist() == [True, False, True]
    assert seen.tolist() == [True, True, False, True, True, True]


# ---------------------------------------------------------------------------------- DDP
def _shrunk(path: Path, model: dict, data: dict, root: Path, **checkpoint) -> Path:
    """An overlay at ``path`` that shrinks a shipped generator config: ``model``'s and ``data``'s settings, all
    files below ``root`` (the callbacks list merges item by item with the config's, by class_path)."""
    path.write_text(yaml.safe_dump({
        "model": {"init_args": model}, "data": data,
        "trainer": {"default_root_dir": str(root), "enable_progress_bar": False, "callbacks": [
            {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
             "init_args": {"dirpath": str(root / "ckpt"), **checkpoint}},
            {"class_path": "ue_lightning.callbacks.PerturbationWriter",
             "init_args": {"output": str(root / "noise.safetensors")}}]}}))
    return path


def _config(tmp: Path, mode: str, name: str, noise_batch_size: int, noise_store: str = "memory") -> list[str]:
    """The repo's digits configs, shrunk: width 4, 201 samples, a fixed surrogate (train_steps 0), 2 rounds."""
    overlay = _shrunk(tmp / f"{name}.yaml", dict(width=4, train_steps=0, max_rounds=2, steps=3,
                                                 noise_batch_size=noise_batch_size, classwise_subset=1.0,
                                                 noise_store=noise_store),
                      {"train_subset": 201}, tmp / name)  # 201, odd: DistributedSampler pads, the pass drops it
    return config_args(*shipped("digits", f"generator/em-{mode}"), overlay)


DDP = ("--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp")


def _fit_in_process(config: list[str]) -> ErrorMinimizingNoise:
    """The same run on one process, through the same CLI parser (no subprocess needed)."""
    from ue_lightning.cli import build_cli

    cli = build_cli(["fit", *config])
    return cli.model


@pytest.mark.slow
def test_ddp_samplewise_noise_and_file_equal_one_process(tmp_path):
    """2 gloo processes with noise batches of 16 each == 1 process with noise batches of 32, exactly.

    Why exactly: ``train_steps=0`` keeps the surrogate at its seeded initialisation (no SGD,
    so DDP's per-rank BatchNorm statistics and gradient averaging never enter), and the
    noise pass runs the surrogate in eval mode, where every sample's PGD is independent of
    the others in its batch. Rank r's unshuffled DistributedSampler shard holds positions
    r, r+2, ...; its j-th batch of 16 plus the other rank's is the single process's j-th
    batch of 32, and the padded duplicate (201 samples) is dropped by ``first_unseen``.
    Two rounds check the warm start from gathered noise. The noise file is then written
    by a 2-process ``ue predict`` and by a 1-process one, and must match byte for byte.
    The 2-process runs keep the noise in one memory-mapped file that both ranks share.
    """
    one = _fit_in_process(_config(tmp_path, "samplewise", "one", 32))
    two_cfg = _config(tmp_path, "samplewise", "two", 16, noise_store="file")
    run_ue("fit", *two_cfg, *DDP, env=ONE_THREAD)
    two = torch.load(tmp_path / "two/ckpt/last.ckpt", weights_only=False)[CHECKPOINT_KEY]
    assert one.rounds == two["rounds"] == 2 and one.pass_accuracy == two["pass_accuracy"]
    assert one.noise.abs().max() > 0
    assert torch.equal(one.noise, two["noise"])

    run_ue("predict", *two_cfg, "--ckpt_path", str(tmp_path / "two/ckpt/last.ckpt"), *DDP,
           env=ONE_THREAD)
    file_two = NoiseFile.open(tmp_path / "two/noise.safetensors")
    file_one = write_noise(one, digits(train_subset=201, eval_batch_size=32, resize=16),  # the config's data
                           tmp_path / "one.safetensors")
    assert np.array_equal(file_one.delta, file_two.delta) and np.array_equal(file_one.covered, file_two.covered)
    assert int(np.asarray(file_two.covered).sum()) == 201 and file_two.max_abs() <= 64


@pytest.mark.slow
def test_ddp_classwise_noise_equals_one_process(tmp_path):
    """Class-wise: each batch's class means are taken over the gathered global batch, summed in index order.

    Same argument as the sample-wise test (fixed surrogate, eval mode, rank shards that
    interleave into the one-process batches, padded duplicate dropped); the class-wise pass
    here runs over all 201 samples (``classwise_subset=1``) in 7 sequential batch updates.
    """
    one = _fit_in_process(_config(tmp_path, "classwise", "one", 32))
    run_ue("fit", *_config(tmp_path, "classwise", "two", 16), *DDP, env=ONE_THREAD)
    two = torch.load(tmp_path / "two/ckpt/last.ckpt", weights_only=False)[CHECKPOINT_KEY]
    assert one.rounds == two["rounds"] == 2 and one.pass_accuracy == two["pass_accuracy"]
    assert one.noise.abs().max() > 0
    assert torch.equal(one.noise, two["noise"])
    assert torch.equal(one.class_delta(), (two["noise"] * 255).round().to(torch.int8))


class _Kill(L.Callback):
    """Stands for a killed job: raises once the module has finished ``after`` noise passes."""

    def __init__(self, after: int):
        self.after = after

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if module.rounds >= self.after:
            raise RuntimeError("killed")  # a crash; a SIGKILL would leave the same files behind


def test_a_killed_em_fit_resumes_from_its_last_round(tmp_path):
    """The shipped config saves last.ckpt every round: a fit killed in round 3 loses at most that round."""
    from ue_lightning.cli import build_cli

    overlay = _shrunk(tmp_path / "em.yaml", dict(width=4, train_steps=2, steps=2, max_rounds=4,
                                                 stop_accuracy=1.01),  # run to the cap
                      dict(train_subset=64, batch_size=16, resize=8), tmp_path, every_n_train_steps=2)
    config = config_args(*shipped("digits", "generator/em-samplewise"), overlay)

    cli = build_cli(config, run=False)
    cli.trainer.callbacks.append(_Kill(after=2))
    with pytest.raises(RuntimeError, match="killed"):
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.model.rounds == 2 and not cli.model.stopped
    saved = torch.load(tmp_path / "ckpt/last.ckpt", weights_only=False)[CHECKPOINT_KEY]
    assert saved["rounds"] >= 1 and saved["noise"].abs().max() > 0  # at most the round in progress is lost

    resumed = build_cli(["fit", *config, "--ckpt_path", str(tmp_path / "ckpt/last.ckpt")]).model
    assert resumed.rounds == 4 and resumed.stopped
    assert resumed.surrogate_steps == 8  # the SGD steps before the kill were not redone
