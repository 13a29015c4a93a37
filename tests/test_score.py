"""ScoreEstimator: denoising score matching against an analytic score, label conditioning,
checkpoint loading (load_for) and the `ue fit` entry point."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from conftest import config_args, cpu_trainer, memory_cap, run_ue, shipped
from ue_lightning.modules import ScoreEstimator
from ue_lightning.modules.score import ScoreCheckpointError, geometric_sigmas
from ue_lightning.ops.sample_rng import indexed_normal

SIZE, TAU, SIGMA = 8, 0.05, 0.1  # 1x8x8 images, class std TAU, DSM noise SIGMA (pixel units)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny networks: one intra-op thread is as fast and avoids contention on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def class_means() -> torch.Tensor:
    """(2, 1, 8, 8): a horizontal and a vertical ramp over [0.35, 0.65]; both average 0.5, so
    m_1 - m_0 has zero mean (a constant label offset is orthogonal to it)."""
    ramp = 0.5 + 0.15 * torch.linspace(-1.0, 1.0, SIZE)
    return torch.stack([ramp[None, :].expand(SIZE, SIZE), ramp[:, None].expand(SIZE, SIZE)])[:, None]


def gaussian_classes(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x ~ N(m_y, TAU^2 I), y alternating; the clamp to [0.05, 0.95] is > 6 TAU away, i.e. a no-op in practice."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    x = (class_means()[y] + TAU * torch.randn(n, 1, SIZE, SIZE, generator=g)).clamp(0.05, 0.95)
    return x, y


def loader(n: int, seed: int, shuffle: bool, batch_size: int = 128) -> DataLoader:
    """Batches (x, y, index) as the UEDataModule serves them."""
    x, y = gaussian_classes(n, seed)
    return DataLoader(TensorDataset(x, y, torch.arange(n)), batch_size=batch_size, shuffle=shuffle)


def quiet_trainer(**kwargs) -> L.Trainer:
    return cpu_trainer(**{"inference_mode": True, **kwargs})


def analytic_score(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Score of the noised class density N(m_y, (TAU^2 + SIGMA^2) I) at x."""
    return -(x - class_means()[y]) / (TAU**2 + SIGMA**2)


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(a.flatten(1), b.flatten(1), dim=1)


@pytest.fixture(scope="module")
def trained() -> tuple[ScoreEstimator, L.Trainer]:
    """A ScoreEstimator trained for 100 steps on the two Gaussian classes (a few seconds on one core)."""
    L.seed_everything(0)
    model = ScoreEstimator(num_classes=2, in_channels=1, image_size=SIZE, width=8, sigma=SIGMA, lr=3e-3)
    trainer = quiet_trainer(max_steps=100)
    trainer.fit(model, loader(2048, seed=0, shuffle=True), loader(256, seed=1, shuffle=False))
    return model.eval(), trainer


def test_score_matches_the_analytic_score_of_the_noised_gaussian(trained):
    # Chance: a random direction in 64 dims has cosine ~ N(0, 1/64) (std 0.125). A label-blind
    # denoiser pulling toward the global mean 0.5 reaches about 0.45, the untrained network about 0,
    # a label-only constant 0. So a mean cosine > 0.8 needs both the x- and the y-dependence;
    # 100 steps reach about 0.97 at the samples and 0.99 at noised points.
    model, trainer = trained
    x, y = gaussian_classes(256, seed=2)
    noisy = x + SIGMA * torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        at_samples = cosine(model.score(x, y), analytic_score(x, y))
        at_noisy = cosine(model.score(noisy, y), analytic_score(noisy, y))
    assert at_samples.mean() > 0.8, at_samples.mean()
    assert at_noisy.mean() > 0.8, at_noisy.mean()
    # the scale is learned too: the estimate is within a factor 2 of the analytic norm at noised points
    ratio = model.score(noisy, y).flatten(1).norm(dim=1) / analytic_score(noisy, y).flatten(1).norm(dim=1)
    assert 0.5 < ratio.mean() < 2.0, ratio.mean()
    # training and validation were logged, and the loss fell below "predict nothing" (0.5 * D = 32)
    metrics = trainer.callback_metrics
    assert {"train/dsm_loss", "val/dsm_loss", "val/dsm_loss_rel"} <= set(metrics)
    assert metrics["val/dsm_loss"] < 0.5 * 0.5 * SIZE * SIZE
    assert torch.isclose(metrics["val/dsm_loss_rel"], metrics["val/dsm_loss"] / (0.5 * SIZE * SIZE))


def test_validation_noise_is_fixed_per_sample(trained):
    model, _ = trained
    first = quiet_trainer().validate(model, loader(256, seed=1, shuffle=False), verbose=False)[0]
    rebatched = quiet_trainer().validate(model, loader(256, seed=1, shuffle=False, batch_size=64), verbose=False)[0]
    assert first["val/dsm_loss"] == pytest.approx(rebatched["val/dsm_loss"], rel=1e-5)
    eps = indexed_normal(torch.arange(20000), (1,), seed=0)
    assert abs(eps.mean()) < 0.03 and abs(eps.std() - 1) < 0.03


def test_score_depends_on_the_label(trained):
    # Evaluate class-0 samples under label 1 (and vice versa): the score must now point to the
    # other class's mean. A label-blind network fails all three checks (about 0.36, 0.36 and 0);
    # the untrained one gives -0.2, -0.6 and -0.3; 100 steps give about 0.97, 0.96 and 0.93.
    model, _ = trained
    x, y = gaussian_classes(256, seed=4)
    other = 1 - y
    with torch.no_grad():
        own, swapped = model.score(x, y), model.score(x, other)
    assert cosine(swapped, analytic_score(x, other)).mean() > 0.8
    towards_other_mean = (class_means()[other] - x)
    assert (cosine(swapped, towards_other_mean) > 0.5).all()
    # the change points along m_other - m_own (its size is under-estimated: x is far outside the
    # other class's training support, so only the direction is asserted)
    assert cosine(swapped - own, class_means()[other] - class_means()[y]).mean() > 0.7


def test_score_is_differentiable_in_x_when_frozen(trained, tmp_path):
    model, trainer = trained
    path = tmp_path / "score.ckpt"
    trainer.save_checkpoint(path)
    frozen = ScoreEstimator.load_for(path, num_classes=2, in_channels=1, image_size=SIZE)
    assert not frozen.training and not any(p.requires_grad for p in frozen.parameters())
    x, y = gaussian_classes(8, seed=5)
    torch.testing.assert_close(frozen.score(x, y), model.score(x, y))
    delta = torch.zeros_like(x, requires_grad=True)
    (grad,) = torch.autograd.grad(frozen.score(x + delta, y).flatten(1).norm(dim=1).sum(), delta)
    assert grad.abs().sum() > 0 and torch.isfinite(grad).all()


def test_load_for_refuses_other_data_and_bad_files(trained, tmp_path):
    _, trainer = trained
    path = tmp_path / "score.ckpt"
    trainer.save_checkpoint(path)
    with pytest.raises(ValueError, match=r"num_classes=2 in the checkpoint but 10.*configs/score/"):
        ScoreEstimator.load_for(path, num_classes=10, in_channels=1, image_size=SIZE)
    with pytest.raises(ValueError, match=r"image_size=8 in the checkpoint but 32") as err:
        ScoreEstimator.load_for(path, num_classes=2, in_channels=1, image_size=32)
    assert "num_classes" not in str(err.value)  # names only what differs
    with pytest.raises(ValueError, match=r"in_channels=1 in the checkpoint but 3"):
        ScoreEstimator.load_for(path, num_classes=2, in_channels=3, image_size=SIZE)

    corrupt = tmp_path / "corrupt.ckpt"
    corrupt.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ScoreCheckpointError, match="not a readable checkpoint"):
        ScoreEstimator.load_for(corrupt, num_classes=2, in_channels=1, image_size=SIZE)
    with pytest.raises(FileNotFoundError, match="does not exist.*configs/score/"):
        ScoreEstimator.load_for(tmp_path / "missing.ckpt", num_classes=2, in_channels=1, image_size=SIZE)
    other = tmp_path / "other.ckpt"
    torch.save({"state_dict": {"model.weight": torch.zeros(1)}, "hyper_parameters": {"num_classes": 2}}, other)
    with pytest.raises(ScoreCheckpointError, match="not of ue_lightning.modules.ScoreEstimator"):
        ScoreEstimator.load_for(other, num_classes=2, in_channels=1, image_size=SIZE)


def test_a_small_crafted_checkpoint_cannot_make_the_loader_allocate_a_huge_network(tmp_path):
    crafted = tmp_path / "crafted.ckpt"  # hyperparameters of a 2.5e12-parameter network beside one tiny weight
    torch.save({"state_dict": {"net.head.weight": torch.zeros(1)}, "hyper_parameters": {
        "num_classes": 2, "in_channels": 1, "image_size": SIZE, "width": 50000, "ema_decay": 0.5}}, crafted)
    assert crafted.stat().st_size < 4096
    with memory_cap(1 << 30), pytest.raises(ScoreCheckpointError, match="weights do not fit") as err:
        ScoreEstimator.load_for(crafted, num_classes=2, in_channels=1, image_size=SIZE)
    assert "\n" not in str(err.value) and "configs/score/" in str(err.value)


def test_several_sigmas_condition_on_the_level_and_score_uses_the_smallest():
    sigmas = geometric_sigmas(1.0, 0.01, 3)
    torch.testing.assert_close(sigmas, torch.tensor([1.0, 0.1, 0.01]))
    L.seed_everything(0)
    model = ScoreEstimator(num_classes=2, in_channels=1, image_size=SIZE, width=4, num_sigmas=3,
                           sigma_min=0.01, sigma_max=1.0, lr=1e-3, ema_decay=0.9)
    quiet_trainer(max_steps=3).fit(model, loader(64, seed=0, shuffle=True, batch_size=16))
    x, y = gaussian_classes(4, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(model.score(x, y), model.ema_net(x, y, 2) / 0.01)
        torch.testing.assert_close(model.score(x, y, sigma_index=0), model.ema_net(x, y, 0) / 1.0)
    # the average moved toward the trained weights but is not them
    live, avg = torch.cat([p.flatten() for p in model.net.parameters()]), torch.cat(
        [p.flatten() for p in model.ema_net.parameters()])
    assert not torch.equal(live, avg) and not any(p.requires_grad for p in model.ema_net.parameters())
    assert all(p.requires_grad for p in model.net.parameters())
    with pytest.raises(ValueError, match="pixel units"):
        ScoreEstimator(num_classes=2, in_channels=1, image_size=SIZE, sigma=25.0)


def test_ue_fit_digits_config_writes_a_checkpoint_load_for_accepts(tmp_path: Path):
    # run in tmp_path: the config's checkpoint dirpath (runs/score/digits/checkpoints) is relative
    run_ue("fit", *config_args(*shipped("digits", "score/dsm")), "--data.resize", "8", "--trainer.max_steps", "4",
           "--trainer.limit_val_batches", "1", "--trainer.default_root_dir", str(tmp_path / "root"),
           "--trainer.enable_progress_bar", "false", cwd=tmp_path, env={"OMP_NUM_THREADS": "1"})
    last = tmp_path / "runs/score/digits/checkpoints/last.ckpt"
    assert last.is_file()
    model = ScoreEstimator.load_for(last, num_classes=10, in_channels=1, image_size=8)
    assert model.hparams.width == 16 and model.sigma_min == pytest.approx(0.1)
    score = model.score(torch.rand(2, 1, 8, 8), torch.tensor([3, 7]))
    assert score.shape == (2, 1, 8, 8) and torch.isfinite(score).all()


@pytest.mark.parametrize("levels, ema", [(1, None), (3, 0.9)])
def test_the_plain_frozen_score_is_the_estimators_score_exactly(tmp_path, levels, ema):
    """What the robust generator and purification load (models/, no LightningModule): the same numbers as the
    estimator's own score, with several noise levels (the smallest) and the weight average (not the live net)."""
    from ue_lightning.models import load_frozen_score

    L.seed_everything(0)
    model = ScoreEstimator(num_classes=2, in_channels=1, image_size=SIZE, width=8, num_sigmas=levels,
                           sigma_min=0.05, sigma_max=0.5, ema_decay=ema)
    trainer = quiet_trainer(max_steps=5)
    trainer.fit(model, loader(64, seed=0, shuffle=True))
    path = tmp_path / "score.ckpt"
    trainer.save_checkpoint(path)
    model.eval()
    frozen = load_frozen_score(path, num_classes=2, in_channels=1, image_size=SIZE)
    x, y = gaussian_classes(8, seed=5)
    assert torch.equal(frozen.score(x, y), model.score(x, y)) and frozen.sigma_min == model.sigma_min
    if ema is not None:
        assert not torch.equal(frozen.score(x, y), model._scaled_score(model.net, x, y, levels - 1) / model.sigmas[-1])
    with pytest.raises(ScoreCheckpointError, match="was trained on other data"):
        load_frozen_score(path, num_classes=3, in_channels=1, image_size=SIZE)


def test_the_frozen_score_takes_any_size_by_padding_the_edges():
    """A photo's side is rarely a multiple of the U-Net's 4: the frozen score pads with edge pixels and crops back,
    so a 13 x 10 image gets the score its padded 16 x 12 copy gets, cut to 13 x 10."""
    from ue_lightning.models import FrozenScore, ScoreNet

    torch.manual_seed(0)
    frozen = FrozenScore(ScoreNet(3, 2, 32, width=4), torch.tensor(0.1), None)
    x, y = torch.rand(2, 3, 13, 10), torch.tensor([0, 1])
    padded = F.pad(x, (0, 2, 0, 3), mode="replicate")
    assert torch.equal(frozen.score(x, y), frozen.score(padded, y)[..., :13, :10])
    assert frozen.score(x[..., :12, :8], y).shape == (2, 3, 12, 8)
