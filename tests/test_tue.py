"""TUE: the CSD, the SimCLR pieces, TransferableNoise through Lightning and the `ue` CLI."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from conftest import config_args, cpu_trainer, run_ue, shipped
from ue_lightning.ops.attacks import pgd_minimize
from ue_lightning.data import NoiseFile, UEDataModule
from ue_lightning.modules import TransferableNoise
from ue_lightning.modules.simclr import classwise_separability, nt_xent, simclr_views
from ue_lightning.ops.shard_duplicates import first_occurrences

ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # 2 shared cores: oversubscribed threads are far slower than one


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ----------------------------------------------------------------------------- CSD
def _hand_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """2-d "noise" of three classes, in scrambled order and with non-contiguous labels.

    class 7: (0,0), (2,0)  -> centre (1,0), spread (1+1)/2 = 1
    class 2: (4,1), (4,7)  -> centre (4,4), spread (3+3)/2 = 3
    class 5: (1,4)         -> centre (1,4), spread 0
    centre distances: |(1,0)-(4,4)| = 5, |(1,0)-(1,4)| = 4, |(4,4)-(1,4)| = 3
    pair ratios: (1+3)/5 = 0.8, (1+0)/4 = 0.25, (3+0)/3 = 1  -> mean 2.05/3
    """
    noise = torch.tensor([[4.0, 1.0], [0.0, 0.0], [1.0, 4.0], [2.0, 0.0], [4.0, 7.0]])
    labels = torch.tensor([2, 7, 5, 7, 2])
    return noise, labels


@pytest.mark.parametrize("detach_spread", [True, False])
def test_csd_matches_hand_computation(detach_spread):
    noise, labels = _hand_batch()
    exact = classwise_separability(noise, labels, detach_spread=detach_spread, stabilizer=0.0)
    assert exact.item() == pytest.approx(2.05 / 3, rel=1e-6)
    assert classwise_separability(noise, labels).item() == pytest.approx(2.05 / 3, rel=1e-4)  # default 1e-5
    two = classwise_separability(noise[:2], labels[:2], stabilizer=0.0)  # classes 2 and 7 with one sample each
    assert two.item() == pytest.approx(0.0)  # spreads 0
    # image-shaped noise is flattened per sample
    assert classwise_separability(noise.view(5, 1, 1, 2), labels, stabilizer=0.0).item() == pytest.approx(2.05 / 3)


def test_csd_is_zero_for_one_class_and_keeps_a_graph():
    noise = torch.randn(4, 3, requires_grad=True)
    loss = classwise_separability(noise, torch.zeros(4, dtype=torch.long))
    assert loss.item() == 0.0
    (grad,) = torch.autograd.grad(loss, noise)
    assert torch.equal(grad, torch.zeros_like(noise))


def test_detached_spread_moves_every_member_of_a_class_alike():
    noise, labels = _hand_batch()
    noise.requires_grad_(True)
    (grad,) = torch.autograd.grad(classwise_separability(noise, labels, detach_spread=True), noise)
    assert torch.allclose(grad[1], grad[3]) and torch.allclose(grad[0], grad[4])  # only centres get gradient
    (grad,) = torch.autograd.grad(classwise_separability(noise, labels, detach_spread=False), noise)
    assert not torch.allclose(grad[0], grad[4])  # the spread term pulls members towards their centre


@pytest.mark.parametrize("detach_spread", [True, False])
def test_csd_falls_under_sign_steps_on_the_noise(detach_spread):
    g = torch.Generator().manual_seed(0)
    x = torch.full((40, 1, 4, 4), 0.5)  # mid-grey: no [0, 1] clipping interferes
    labels = torch.arange(40) % 4
    radius = 8 / 255
    start = (2 * torch.rand(x.shape, generator=g) - 1) * radius

    def csd(perturbed: torch.Tensor) -> torch.Tensor:
        return classwise_separability(perturbed - x, labels, detach_spread=detach_spread)

    before = csd(x + start).item()
    delta = pgd_minimize(csd, x, radius=radius, step_size=0.8 / 255, steps=5, init=start)
    after = csd(x + delta).item()
    assert delta.abs().max() <= radius + 1e-7
    assert after < 0.7 * before, (before, after)


def _class_patterns(kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise (40, 1, 8, 8) of four classes, every member of a class given its class's pattern exactly.

    ``pixels``: a random +-1 pattern per pixel; ``flat``: one constant value per class.
    """
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(40) % 4
    if kind == "pixels":
        patterns = torch.randint(0, 2, (4, 1, 8, 8), generator=g).float() * 2 - 1
    else:
        patterns = torch.tensor([-1.0, -0.3, 0.3, 1.0]).view(4, 1, 1, 1).expand(4, 1, 8, 8)
    return patterns[labels].clone(), labels


def test_csd_views_score_what_survives_crops():
    gen = _tiny_generator(csd_views=4, csd_view_padding=2)
    index = torch.arange(40)
    pixels, labels = _class_patterns("pixels")
    flat, _ = _class_patterns("flat")
    plain = _tiny_generator()  # csd_views 0: the paper's CSD of the noise itself
    assert plain.csd_loss(pixels, labels).item() < 1e-4  # identical members: no spread at all
    assert plain.csd_loss(flat, labels).item() < 1e-4
    shifted_pixels = gen.csd_loss(pixels, labels, index).item()
    shifted_flat = gen.csd_loss(flat, labels, index).item()
    assert shifted_pixels > 4 * shifted_flat, (shifted_pixels, shifted_flat)  # shifts scatter a pixel pattern
    # the views are drawn per sample: the same whatever the batch order, new for another draw
    order = torch.randperm(40, generator=torch.Generator().manual_seed(1))
    assert gen.csd_loss(pixels[order], labels[order], index[order]).item() == pytest.approx(shifted_pixels, rel=1e-5)
    assert gen.csd_loss(pixels, labels, index, draw=1).item() != pytest.approx(shifted_pixels, rel=1e-5)
    with pytest.raises(ValueError, match="indices"):
        gen.csd_loss(pixels, labels)
    with pytest.raises(ValueError, match="csd_views"):
        _tiny_generator(csd_views=-1)


def test_csd_views_fall_under_sign_steps():
    gen = _tiny_generator(csd_views=2, csd_view_padding=1)
    g = torch.Generator().manual_seed(0)
    x = torch.full((40, 1, 8, 8), 0.5)
    labels, index = torch.arange(40) % 4, torch.arange(40)
    radius = 8 / 255
    start = (2 * torch.rand(x.shape, generator=g) - 1) * radius
    before = gen.csd_loss(start, labels, index, draw=99).item()
    delta = pgd_minimize(gen.noise_objective(x, labels, index), x, radius=radius, step_size=0.8 / 255, steps=10,
                         init=start)
    assert delta.abs().max() <= radius + 1e-7
    assert gen.csd_loss(delta, labels, index, draw=99).item() < 0.7 * before  # on views it never saw


# ----------------------------------------------------------------------------- SimCLR pieces
def test_nt_xent_prefers_matching_views():
    torch.manual_seed(0)
    z = torch.randn(8, 16)
    matched = nt_xent(z, z + 0.01 * torch.randn(8, 16))
    shuffled = nt_xent(z, z[torch.randperm(8)])
    assert matched < shuffled
    assert matched > 0  # the negatives still cost something


@pytest.mark.parametrize("channels", [1, 3])
def test_simclr_views_are_per_sample_differentiable_and_in_range(channels):
    torch.manual_seed(0)
    x = torch.rand(6, channels, 16, 16, requires_grad=True)
    views = simclr_views(x, 12)
    assert views.shape == (6, channels, 12, 12)
    assert views.min() >= 0 and views.max() <= 1
    (grad,) = torch.autograd.grad(views.sum(), x)
    assert grad.abs().sum() > 0
    same = x.detach()[:1].expand(6, -1, -1, -1)
    per_sample = simclr_views(same)
    assert not torch.allclose(per_sample[0], per_sample[1])  # each sample draws its own view


def test_first_occurrences_drops_gathered_padding_repeats():
    index = torch.tensor([5, 3, 5, 1, 3, 9])  # e.g. rank 0: 5, 3, 5; rank 1: 1, 3, 9
    keep = first_occurrences(index)
    assert keep.tolist() == [True, True, False, True, False, True]


# ----------------------------------------------------------------------------- the generator
def _digits(**kw) -> UEDataModule:
    args = dict(dataset="digits", batch_size=32, eval_batch_size=128, train_subset=128, augment=False)
    return UEDataModule(**{**args, **kw})


def _tiny_generator(**kw) -> TransferableNoise:
    args = dict(num_classes=10, in_channels=1, image_size=8, width=4, steps=2, train_steps=2,
                noise_batch_size=64, crop_scale=(0.5, 1.0), flip_p=0.0)
    return TransferableNoise(**{**args, **kw})


def _trainer(tmp_path: Path, max_epochs: int, **kw) -> L.Trainer:
    return cpu_trainer(tmp_path, max_epochs=max_epochs, **kw)


class _NoiseAtStart(L.Callback):
    def on_train_start(self, trainer, pl_module):
        self.noise, self.passes = pl_module.noise.clone(), pl_module.noise_passes


def test_noise_state_survives_save_and_resume(tmp_path, one_thread):
    L.seed_everything(0)
    gen = _tiny_generator(ssl_weight=1.0, csd_weight=1.0)  # the combined objective: SSL term and surrogate train
    trainer = _trainer(tmp_path, max_epochs=1)
    trainer.fit(gen, datamodule=_digits())
    assert gen.noise_passes == 2 and trainer.global_step == 4  # 128 / 32 = 4 batches, a pass every 2
    saved = gen.noise.clone()
    assert saved.shape == (1347, 1, 8, 8)  # the whole split, indexed by sample
    start = gen._initial_noise(saved.shape)
    touched = (saved != start).flatten(1).any(1)
    subset = _digits().train_indices()
    assert touched[subset].all() and not touched.scatter(0, subset, False).any()  # exactly the train subset
    assert saved.abs().max() <= 8 / 255 + 1e-6
    ckpt = tmp_path / "tue.ckpt"
    trainer.save_checkpoint(ckpt)

    loaded = TransferableNoise.load_from_checkpoint(ckpt)
    assert torch.equal(loaded.noise, saved) and loaded.noise_passes == 2

    probe = _NoiseAtStart()
    resumed = _tiny_generator(ssl_weight=1.0, csd_weight=1.0)
    trainer = _trainer(tmp_path, max_epochs=2, callbacks=[probe])
    trainer.fit(resumed, datamodule=_digits(), ckpt_path=ckpt)
    assert torch.equal(probe.noise, saved) and probe.passes == 2  # resumed, not restarted
    assert trainer.global_step == 8 and resumed.noise_passes == 4
    assert not torch.equal(resumed.noise, saved)


def test_at_ssl_weight_zero_the_backbone_plays_no_part_and_at_one_it_does(tmp_path, one_thread):
    """TUE's SimCLR and SimSiam demos set the SSL weight to 0: the CSD alone shapes the noise, so the two backbones
    give the very same noise for one seed (as the CPU protocol's tue and tue-simsiam files are, bit for bit);
    with the SSL loss let in, the backbone changes it."""
    def noise(backbone: str, ssl_weight: float) -> torch.Tensor:
        L.seed_everything(0)
        gen = _tiny_generator(backbone=backbone, ssl_weight=ssl_weight, csd_weight=0.1, seed=3)
        _trainer(tmp_path / backbone, max_epochs=1).fit(gen, datamodule=_digits())
        return gen.noise.clone()

    assert torch.equal(noise("simclr", 0.0), noise("simsiam", 0.0))
    assert not torch.equal(noise("simclr", 1.0), noise("simsiam", 1.0))


def test_generator_refuses_augmented_data_and_predicting_untrained(tmp_path):
    with pytest.raises(ValueError, match="augment: false"):
        _trainer(tmp_path, max_epochs=1).fit(_tiny_generator(), datamodule=_digits(augment=True))
    x = torch.rand(2, 1, 8, 8)
    with pytest.raises(RuntimeError, match="ckpt_path"):
        _tiny_generator().generate(x, torch.zeros(2, dtype=torch.long), torch.arange(2))
    with pytest.raises(ValueError, match="csd_weight"):
        _tiny_generator(ssl_weight=0.0, csd_weight=0.0)
    with pytest.raises(ValueError, match="1/255 units"):
        _tiny_generator(step_size=0.003)


CLI = [*config_args(*shipped("digits", "generator/tue")), "--model.init_args.width", "4",
       "--model.init_args.steps", "4", "--model.init_args.train_steps", "5", "--data.train_subset", "200",
       "--data.batch_size", "40", "--data.resize", "8", "--model.init_args.epsilon", "8",  # _tiny_generator's
       "--model.init_args.step_size", "0.8", "--trainer.enable_progress_bar", "false",
       "--trainer.enable_model_summary", "false"]


def _checkpoint(root: Path) -> Path:
    ckpt = root / "runs/generator/tue-digits/checkpoints/last.ckpt"
    assert ckpt.is_file(), f"fit wrote no {ckpt}"
    return ckpt


def test_cli_fit_then_predict_writes_a_valid_noise_file(tmp_path):
    run_ue("fit", *CLI, "--trainer.max_epochs", "2", cwd=tmp_path, env=ONE_THREAD)
    run_ue("predict", *CLI, "--ckpt_path", str(_checkpoint(tmp_path)), cwd=tmp_path, env=ONE_THREAD)
    noise = NoiseFile.open(tmp_path / "runs/noise/tue-digits.safetensors")  # the config's PerturbationWriter
    assert noise.metadata.method == "tue" and noise.metadata.epsilon == 8 and not noise.classwise
    assert noise.delta.shape == (1347, 1, 8, 8)
    assert 0 < noise.max_abs() <= 8
    dm = UEDataModule(dataset="digits", train_subset=200, perturbation=str(noise.path))
    dm.setup("fit")  # fingerprint and coverage checks of the noise file
    covered = torch.from_numpy(noise.covered.copy()).bool()
    assert covered.sum() == 200 and covered[dm.train_indices()].all()
    state = torch.load(_checkpoint(tmp_path), map_location="cpu", weights_only=False)["transferable_noise"]
    expected = state["noise"][dm.train_indices()].float() * 255  # projected already: x + noise stays in [0, 1]
    got = torch.from_numpy(noise.delta[dm.train_indices().numpy()].copy()).float()
    assert ((got - expected).abs() <= 0.5 + 1e-3).float().mean() > 0.999  # the file is the state, rounded


@pytest.mark.slow
def test_ddp_noise_pass_updates_every_shard_on_every_rank(tmp_path):
    ddp = ["--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp",
           "--model.init_args.noise_store", "file"]  # one memory-mapped copy that both ranks share
    run_ue("fit", *CLI, "--trainer.max_epochs", "2", *ddp, cwd=tmp_path, env=ONE_THREAD)
    state = torch.load(_checkpoint(tmp_path), map_location="cpu", weights_only=False)["transferable_noise"]
    gen = _tiny_generator()
    start = gen._initial_noise(tuple(state["noise"].shape))
    subset = _digits(train_subset=200).train_indices()
    touched = (state["noise"] != start).flatten(1).any(1)
    # rank 0 saved the checkpoint: without the all-gather it would hold only its own half of the pass
    assert touched[subset].all() and touched.sum() == 200
    assert state["noise_passes"] == 1  # 100 samples per rank = 3 batches of 40 per epoch: one pass, at step 5


def test_noise_for_other_data_from_a_learner_fitted_on_these(tmp_path, fake_npz, fake_cifar10, one_thread):
    """TUE's transfer across datasets: the learner fitted on data A (an .npz) makes the noise of data B (CIFAR-10's
    files); frozen by default, so only B's noise moves; ``surrogate_frozen: false`` trains it on."""
    L.seed_everything(0)
    rgb = dict(in_channels=3, image_size=16, ssl_weight=1.0, csd_weight=1.0)  # the SSL term reads the learner
    on_a = _tiny_generator(**rgb)
    trainer = _trainer(tmp_path / "a", max_epochs=1)
    trainer.fit(on_a, datamodule=UEDataModule("npz", root=str(fake_npz), batch_size=20, augment=False))
    ckpt = tmp_path / "a.ckpt"
    trainer.save_checkpoint(ckpt)
    fitted = {k: v.clone() for k, v in on_a.net.state_dict().items()}
    assert any(not torch.equal(v, fitted[k]) for k, v in _tiny_generator(**rgb).net.state_dict().items())

    def data_b() -> UEDataModule:
        return UEDataModule("cifar10", root=str(fake_cifar10), batch_size=20, augment=False)

    rgb["image_size"] = 32  # B's images are larger than A's: the encoder takes any size
    on_b = _tiny_generator(**rgb, surrogate_checkpoint=str(ckpt))
    _trainer(tmp_path / "b", max_epochs=1).fit(on_b, datamodule=data_b())
    assert on_b.noise_passes == 2 and on_b.noise.shape == (100, 3, 32, 32)
    assert 0 < on_b.noise.abs().max() <= 8 / 255 + 1e-6
    assert all(torch.equal(v, fitted[k]) for k, v in on_b.net.state_dict().items())  # A's learner, untouched
    trained_on = _tiny_generator(**rgb, surrogate_checkpoint=str(ckpt), surrogate_frozen=False)
    _trainer(tmp_path / "c", max_epochs=1).fit(trained_on, datamodule=data_b())
    assert any(not torch.equal(v, fitted[k]) for k, v in trained_on.net.state_dict().items())


def test_a_surrogate_checkpoint_of_another_learner_is_refused(tmp_path, fake_cifar10):
    grey = _tiny_generator(image_size=32)  # in_channels 1: a learner of grey images
    torch.save({"hyper_parameters": dict(grey.hparams), "state_dict": grey.state_dict()}, tmp_path / "grey.ckpt")
    data = UEDataModule("cifar10", root=str(fake_cifar10), batch_size=20, augment=False)
    rgb = _tiny_generator(in_channels=3, image_size=32, surrogate_checkpoint=str(tmp_path / "grey.ckpt"))
    with pytest.raises(ValueError, match=r"another learner \(in_channels=1 there, 3 here\).*backbone, arch, width"):
        _trainer(tmp_path, max_epochs=1).fit(rgb, datamodule=data)
    missing = _tiny_generator(in_channels=3, image_size=32, surrogate_checkpoint=str(tmp_path / "none.ckpt"))
    with pytest.raises(FileNotFoundError, match="does not exist: give the last.ckpt"):
        _trainer(tmp_path, max_epochs=1).fit(missing, datamodule=data)
