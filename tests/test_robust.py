"""RobustNoiseGenerator: REM and data collapse (budgets, batch independence, score step, resume, grads)."""

from __future__ import annotations

import copy
import inspect
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from ue_lightning.models import FrozenScore
from ue_lightning.modules import robust
from ue_lightning.modules.robust import RobustNoiseGenerator, score_norm
from ue_lightning.modules.score import ScoreCheckpointError, ScoreEstimator

REPO = Path(__file__).resolve().parents[1]
TINY = dict(num_classes=4, in_channels=1, image_size=8, width=4, steps=3, step_size=2.0, adv_steps=2,
            adv_step_size=1.6, eot_samples=2, eot_padding=1, eot_flip=False)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one thread is faster than two on a shared machine (no oversubscription)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def digits_like(n: int = 24, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Images on the uint8 grid (with saturated pixels), labels, and indices into a larger split."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 1, 8, 8), generator=g).float() / 255
    x[:, :, :2] = 0.0  # saturated rows: the [0, 1] box must bind
    x[:, :, -2:] = 1.0
    y = torch.arange(n) % 4
    index = torch.arange(n) * 7 + 3
    return x, y, index


def make_generator(**kwargs) -> RobustNoiseGenerator:
    torch.manual_seed(0)
    return RobustNoiseGenerator(**{**TINY, **kwargs})


class GaussianClassScore(nn.Module):
    """Stand-in score of a Gaussian per class, N(mu_y, sigma^2 I): s(x, y) = (mu_y - x) / sigma^2."""

    def __init__(self, num_classes: int = 4, shape: tuple[int, ...] = (1, 8, 8), sigma: float = 0.1):
        super().__init__()
        self.register_buffer("mu", torch.rand(num_classes, *shape, generator=torch.Generator().manual_seed(1)))
        self.sigma = sigma
        self.requires_grad_(False).eval()

    def score(self, x: Tensor, y: Tensor) -> Tensor:
        return (self.mu[y] - x) / self.sigma**2


def mean_score_norm(score_fn, x: Tensor, y: Tensor) -> float:
    with torch.no_grad():
        return score_norm(score_fn, x, y).item() / len(y)


def test_score_norm_is_per_sample_l2_summed() -> None:
    x = torch.zeros(2, 1, 2, 2)
    s = lambda x, y: torch.stack([torch.full((1, 2, 2), 3.0), torch.full((1, 2, 2), 4.0)])  # noqa: E731
    assert score_norm(s, x, torch.zeros(2, dtype=torch.long)).item() == pytest.approx(6.0 + 8.0)


@pytest.mark.parametrize("form", ["rem", "plain"])
def test_collapse_step_lowers_the_score_norm(form: str, monkeypatch: pytest.MonkeyPatch) -> None:
    stand_in = GaussianClassScore()
    monkeypatch.setattr(robust, "load_score_model", lambda path, **facts: stand_in)
    x, y, index = digits_like()
    collapse = make_generator(form=form, score_checkpoint="stand-in.ckpt", score_step_size=2.0)
    rem = make_generator(form=form)
    assert (collapse.method, rem.method) == ("collapse", "rem")
    assert rem.score_model() is None
    with_score = mean_score_norm(stand_in.score, x + collapse.generate(x, y, index), y)
    without = mean_score_norm(stand_in.score, x + rem.generate(x, y, index), y)
    clean = mean_score_norm(stand_in.score, x, y)
    # an 8/255 ball moves a pixel ~0.03 towards mu_y, ~0.3 away: a few per cent of the norm at most
    assert with_score < min(without, clean) - 0.01 * clean, (with_score, without, clean)


def save_score_checkpoint(path: Path, **hparams) -> ScoreEstimator:
    torch.manual_seed(0)
    est = ScoreEstimator(**{"num_classes": 4, "in_channels": 1, "image_size": 8, "width": 4, **hparams})
    torch.save({"hyper_parameters": dict(est.hparams), "state_dict": est.state_dict()}, path)
    return est


def test_real_score_estimator_is_loaded_frozen_and_kept_out_of_the_state(tmp_path: Path) -> None:
    ckpt = tmp_path / "score.ckpt"
    save_score_checkpoint(ckpt)
    x, y, index = digits_like(8)
    gen = make_generator(score_checkpoint=str(ckpt), steps=2)
    gen.setup("fit")
    score = gen.score_model()
    assert isinstance(score, FrozenScore) and not score.training
    assert not any(p.requires_grad for p in score.parameters())
    assert all(not k.startswith("_score") and not k.startswith("net.") for k in gen.state_dict())
    assert {id(p) for p in gen.parameters()}.isdisjoint({id(p) for p in score.parameters()})
    gen.train()  # Lightning's train()/eval() of the generator must not reach the score model
    assert not score.training
    collapse = gen.generate(x, y, index)
    rem = make_generator(steps=2).generate(x, y, index)
    assert mean_score_norm(score.score, x + collapse, y) < mean_score_norm(score.score, x + rem, y)


def test_mismatched_score_checkpoint_is_refused(tmp_path: Path) -> None:
    ckpt = tmp_path / "score.ckpt"
    save_score_checkpoint(ckpt, num_classes=10)
    with pytest.raises(ScoreCheckpointError, match="num_classes"):
        make_generator(score_checkpoint=str(ckpt)).setup("fit")


@pytest.mark.parametrize(("form", "start"), [("rem", "random"), ("plain", "zero")])
def test_noise_respects_the_budget_and_the_pixel_box(form: str, start: str) -> None:
    x, y, index = digits_like()
    gen = make_generator(form=form, start=start)
    delta = gen.generate(x, y, index)
    assert delta.shape == x.shape and not delta.requires_grad
    assert delta.abs().max() <= gen.radius_px + 1e-6
    assert delta.abs().max() > 0.5 * gen.radius_px  # it did move
    assert (x + delta).min() >= 0.0 and (x + delta).max() <= 1.0
    assert (delta[:, :, :2] >= 0).all() and (delta[:, :, -2:] <= 0).all()


def test_generate_is_independent_of_batch_composition() -> None:
    x, y, index = digits_like(24)
    gen = make_generator()
    whole = gen.generate(x, y, index)
    other = torch.tensor([20, 5, 11, 2, 17])
    part = gen.generate(x[other], y[other], index[other])
    assert torch.equal(part, whole[other])
    # the noise depends on the sample's index (its own random start and crops), not on its position
    shuffled = gen.generate(x[other], y[other], index[other] + 1)
    assert not torch.equal(shuffled, part)


def test_generate_works_under_inference_mode_and_eval() -> None:
    x, y, index = digits_like(6)
    gen = make_generator().eval()
    expected = gen.generate(x, y, index)
    with torch.inference_mode():
        got = gen.generate(x, y, index)
    assert torch.equal(got, expected)


def test_inner_loops_leave_parameter_grads_and_running_stats_alone() -> None:
    x, y, index = digits_like(8)
    gen = make_generator()
    buffers = {k: v.clone() for k, v in gen.model.state_dict().items() if "running" in k}
    gen.train()
    gen.update_batch(x, y, index, step=0)
    assert all(p.grad is None and p.requires_grad for p in gen.parameters())
    assert gen.model.training
    for k, v in gen.model.state_dict().items():
        if k in buffers:
            assert torch.equal(v, buffers[k]), k  # inner_mode eval: no BatchNorm statistics update


def fit(model: RobustNoiseGenerator, loader: DataLoader, root: Path, ckpt_path: str | None = None,
        callbacks: list | None = None, **limits) -> L.Trainer:
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=bool(callbacks),
                        callbacks=callbacks, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=root, **limits)
    trainer.fit(model, loader, ckpt_path=ckpt_path)
    return trainer


def test_the_update_is_one_sgd_step_on_the_adversarial_batch_only(tmp_path: Path) -> None:
    x, y, index = digits_like(8)
    gen = make_generator(lr=0.05)
    reference = copy.deepcopy(gen)
    fit(gen, DataLoader(TensorDataset(x, y, index), batch_size=8), tmp_path, max_steps=1)

    reference.train()
    _, x_adv = reference.update_batch(x, y, index, step=0)
    optimizer = torch.optim.SGD(reference.model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    F.cross_entropy(reference.model(x_adv), y).backward()
    optimizer.step()
    for (name, got), want in zip(gen.model.state_dict().items(), reference.model.state_dict().values()):
        assert torch.allclose(got, want, atol=1e-6, rtol=1e-5), name
    moved = sum((a - b).abs().sum() for a, b in zip(gen.model.parameters(), make_generator().model.parameters()))
    assert moved > 0


RESUME = dict(lr_decay_steps=4, steps=2, eot_samples=1)


def test_resume_at_an_epoch_boundary_matches_the_uninterrupted_run(tmp_path: Path) -> None:
    x, y, index = digits_like(24)
    loader = DataLoader(TensorDataset(x, y, index), batch_size=8)  # 3 steps per epoch, same order each epoch
    straight = make_generator(**RESUME)
    fit(straight, loader, tmp_path / "a", max_epochs=2)

    first = make_generator(**RESUME)
    fit(first, loader, tmp_path / "b", max_epochs=1).save_checkpoint(tmp_path / "half.ckpt")
    resumed = make_generator(**RESUME)
    trainer = fit(resumed, loader, tmp_path / "c", ckpt_path=str(tmp_path / "half.ckpt"), max_epochs=2)

    assert trainer.global_step == 6
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.1 * 0.1)  # decayed at step 4, after resume
    assert all("momentum_buffer" in s for s in trainer.optimizers[0].state_dict()["state"].values())
    assert not torch.equal(next(first.parameters()), next(resumed.parameters()))
    for (name, got), want in zip(resumed.state_dict().items(), straight.state_dict().values()):
        assert torch.allclose(got.float(), want.float(), atol=1e-6, rtol=1e-5), name


class FirstStep(L.Callback):
    """Records global_step, lr and weights when the first training batch of a run starts."""

    def __init__(self):
        self.seen: dict | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.seen is None:
            self.seen = {"step": trainer.global_step, "lr": trainer.optimizers[0].param_groups[0]["lr"],
                         "state": copy.deepcopy(pl_module.model.state_dict())}


def test_resume_from_last_ckpt_of_a_max_steps_run_continues(tmp_path: Path) -> None:
    """The CLI path: ModelCheckpoint's last.ckpt after max_steps, then a longer max_steps from it."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    x, y, index = digits_like(24)
    loader = DataLoader(TensorDataset(x, y, index), batch_size=8, shuffle=True)
    first = make_generator(**RESUME)
    fit(first, loader, tmp_path, callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)], max_steps=5)
    stopped = copy.deepcopy(first.model.state_dict())
    probe = FirstStep()
    resumed = make_generator(**RESUME)
    trainer = fit(resumed, loader, tmp_path, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"),
                  callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True), probe], max_steps=7)
    assert probe.seen["step"] == 5 and trainer.global_step == 7
    assert probe.seen["lr"] == pytest.approx(0.01)  # the scheduler state came back (decayed at 4)
    for name, want in stopped.items():
        assert torch.equal(probe.seen["state"][name], want), name


def test_bad_settings_are_refused_with_the_fix() -> None:
    with pytest.raises(ValueError, match="score_checkpoint"):
        make_generator(score_step_size=1.0)
    with pytest.raises(ValueError, match="1/255 units"):
        make_generator(epsilon=8 / 255)
    with pytest.raises(ValueError, match="form"):
        make_generator(form="minmax")
    assert make_generator(score_checkpoint="x.ckpt", score_step_size=0).method == "rem"


def test_method_configs_are_complete_and_accepted() -> None:
    """rem.yaml and collapse.yaml (composed on a data config; paths and instantiation: tests/test_configs.py)."""
    rem = yaml.safe_load((REPO / "configs" / "generator" / "rem.yaml").read_text())
    collapse = yaml.safe_load((REPO / "configs" / "generator" / "collapse.yaml").read_text())
    assert rem["data"]["augment"] is False  # the generator augments itself (EOT)
    args = rem["model"]["init_args"]
    assert rem["model"]["class_path"] == "ue_lightning.modules.RobustNoiseGenerator" and "score_checkpoint" not in args
    extra = collapse["model"]["init_args"]
    accepted = set(inspect.signature(RobustNoiseGenerator.__init__).parameters)
    assert set(args) | set(extra) <= accepted, (set(args) | set(extra)) - accepted
    assert extra["score_checkpoint"] == "runs/score/{data}/checkpoints/last.ckpt"
    assert rem["trainer"]["max_steps"] > 0
    RobustNoiseGenerator(**args)  # budgets in 1/255 units, valid choices
