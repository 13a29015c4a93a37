"""Baseline noises: TAP, uniform random noise and LSP (ue_lightning.modules.baselines)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import config_args, run_ue, shipped
from torch.utils.data import DataLoader

from ue_lightning.data import UEDataModule
from ue_lightning.data.noise_file import NoiseFile, apply_delta, quantize_delta
from ue_lightning.modules import LinearSeparableNoise, RandomNoise, TargetedAdversarialPoison, VictimClassifier
from ue_lightning.modules.baselines import target_map
from ue_lightning.modules.generator_base import to_uint8


# --------------------------------------------------------------------------- fixtures
def _write_soft_digits(path: Path) -> Path:
    """scikit-learn's digits at 16x16x3 and low contrast (grey 128 +- 16, slight noise), as an .npz.

    Real digits, but in the regime where small L-infinity perturbations matter (natural images):
    on the embedded 8x8 full-contrast digits even 32/255 rarely flips a prediction, so they
    cannot show that TAP steers predictions.
    """
    from sklearn.datasets import load_digits

    d = load_digits()
    img = torch.tensor(d.images / 16.0, dtype=torch.float32)[:, None]
    big = F.interpolate(img, scale_factor=2, mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    rng = np.random.default_rng(0)
    x = (128 + (big - 0.5) * 32 + torch.from_numpy(rng.normal(0, 3, big.shape)).float()).round().clamp(0, 255)
    x = x.to(torch.uint8).permute(0, 2, 3, 1).numpy()
    np.savez(path, x_train=x[:600], y_train=d.target[:600], x_test=x[600:800], y_test=d.target[600:800])
    return path


def _train_victim(dm: UEDataModule, path: Path, epochs: int, max_steps: int = -1, **kwargs) -> Path:
    L.seed_everything(0)
    model = VictimClassifier(arch="resnet18", num_classes=dm.num_classes, in_channels=dm.in_channels,
                             image_size=dm.image_size, lr=0.02, weight_decay=0.0, **kwargs)
    trainer = L.Trainer(max_epochs=epochs, max_steps=max_steps, accelerator="cpu", logger=False,
                        enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, dm)
    trainer.save_checkpoint(path)
    return path


@pytest.fixture(scope="module")
def soft_digits(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(npz path, checkpoint of a ResNet-18 (width 8) trained on it for 2 epochs, ~90% test accuracy)."""
    root = tmp_path_factory.mktemp("soft_digits")
    npz = _write_soft_digits(root / "soft_digits.npz")
    dm = UEDataModule("npz", root=str(npz), batch_size=32, augment=False)
    return npz, _train_victim(dm, root / "victim.ckpt", epochs=2, width=8)


@pytest.fixture(scope="module")
def digits_victim(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny VictimClassifier checkpoint for the embedded digits (width 4, 5 steps: the plumbing, not accuracy)."""
    dm = UEDataModule("digits", batch_size=64, augment=False)
    return _train_victim(dm, tmp_path_factory.mktemp("digits_victim") / "victim.ckpt", epochs=1, max_steps=5, width=4)


def _batch(dm: UEDataModule, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dm.setup("predict")
    return next(iter(DataLoader(dm.predict_set, batch_size=n)))


def _quantized(gen, x, y, index) -> torch.Tensor:
    """int8 delta (1/255 units) exactly as `ue predict` writes it."""
    return quantize_delta(to_uint8(x), gen.generate(x, y, index))


# --------------------------------------------------------------------------- TAP
def test_tap_steers_predictions_to_the_target_class(soft_digits):
    npz, ckpt = soft_digits
    x, y, index = _batch(UEDataModule("npz", root=str(npz)), 120)
    tap = TargetedAdversarialPoison(str(ckpt), num_classes=10, in_channels=3, image_size=16, epsilon=8,
                                    steps=10, step_size=2, augment=False).eval()
    delta = _quantized(tap, x, y, index)
    assert delta.abs().max() <= 8
    poisoned = apply_delta(to_uint8(x), delta).float() / 255
    target = (y + 1) % 10
    with torch.no_grad():
        clean_pred, poison_pred = tap.classifier(x).argmax(1), tap.classifier(poisoned).argmax(1)
    assert (clean_pred == y).float().mean() > 0.7  # the classifier is a real one
    assert (clean_pred == target).float().mean() < 0.2
    assert (poison_pred == target).float().mean() >= 0.8

    # another permutation: the poisons follow it, not the default shift
    perm = [(k + 3) % 10 for k in range(10)]
    tap3 = TargetedAdversarialPoison(str(ckpt), num_classes=10, in_channels=3, image_size=16, epsilon=8,
                                     steps=10, step_size=2, augment=False, target_permutation=perm).eval()
    poisoned3 = apply_delta(to_uint8(x), _quantized(tap3, x, y, index)).float() / 255
    with torch.no_grad():
        pred3 = tap3.classifier(poisoned3).argmax(1)
    assert (pred3 == (y + 3) % 10).float().mean() >= 0.8


def test_tap_with_augmentation_is_independent_of_batching(digits_victim):
    x, y, index = _batch(UEDataModule("digits"), 48)
    tap = TargetedAdversarialPoison(str(digits_victim), num_classes=10, in_channels=1, image_size=8, steps=4,
                                    step_size=2, padding=1, flip=False, restarts=2).eval()
    whole = _quantized(tap, x, y, index)
    parts = torch.cat([_quantized(tap, x[s], y[s], index[s]) for s in (slice(0, 13), slice(13, 48))])
    assert torch.equal(whole, parts)
    assert whole.abs().max() <= 8 and whole.abs().float().mean() > 2  # it moved
    tap.train()
    assert not tap.classifier.training  # frozen in eval mode whatever Lightning asks
    assert not any(p.requires_grad for p in tap.classifier.parameters())


def test_tap_refuses_checkpoints_that_do_not_fit(digits_victim, tmp_path):
    good = dict(num_classes=10, in_channels=1, image_size=8)
    with pytest.raises(FileNotFoundError, match="ue fit"):
        TargetedAdversarialPoison(str(tmp_path / "missing.ckpt"), **good)
    corrupt = tmp_path / "corrupt.ckpt"
    corrupt.write_bytes(b"\x00not a checkpoint" * 10)
    with pytest.raises(ValueError, match="corrupt"):
        TargetedAdversarialPoison(str(corrupt), **good)
    other = tmp_path / "other.ckpt"
    torch.save({"state_dict": {"surrogate.w": torch.zeros(2)},
                "hyper_parameters": {"_class_path": "ue_lightning.modules.ScoreEstimator"}}, other)
    with pytest.raises(ValueError, match="ScoreEstimator, not of ue_lightning.modules.VictimClassifier"):
        TargetedAdversarialPoison(str(other), **good)
    for wrong, what in (({"num_classes": 5}, "num_classes"), ({"in_channels": 3}, "in_channels"),
                        ({"image_size": 32}, "image_size")):
        with pytest.raises(ValueError, match=rf"{what}=\d+ in the checkpoint but"):
            TargetedAdversarialPoison(str(digits_victim), **{**good, **wrong})


def test_target_map():
    assert target_map(4).tolist() == [1, 2, 3, 0]
    assert target_map(4, shift=3).tolist() == [3, 0, 1, 2]
    assert target_map(3, permutation=[2, 0, 1]).tolist() == [2, 0, 1]
    with pytest.raises(ValueError, match="itself"):
        target_map(4, shift=4)
    with pytest.raises(ValueError, match="themselves"):
        target_map(3, permutation=[0, 2, 1])
    with pytest.raises(ValueError, match="permutation"):
        target_map(3, permutation=[1, 1, 0])


# --------------------------------------------------------------------------- random noise
def test_random_noise_is_bounded_uniform_and_deterministic():
    x = torch.rand(64, 3, 8, 8)
    x[:4] = 0.0  # black images: the box is one-sided
    y, index = torch.arange(64) % 10, torch.arange(100, 164)
    gen = RandomNoise(epsilon=6, seed=1)
    delta = _quantized(gen, x, y, index)
    assert delta.abs().max() == 6 and delta[:4].min() >= 0
    free = delta[4:].float()
    assert abs(free.mean()) < 0.2 and 2.5 < free.std() < 4.5  # uniform integers in [-6, 6]: std ~3.6
    assert torch.equal(delta, torch.cat([_quantized(gen, x[:20], y[:20], index[:20]),
                                         _quantized(gen, x[20:], y[20:], index[20:])]))
    assert torch.equal(delta, _quantized(RandomNoise(epsilon=6, seed=1), x, y, index))
    assert not torch.equal(delta, _quantized(RandomNoise(epsilon=6, seed=2), x, y, index))
    signed = _quantized(RandomNoise(epsilon=6, sign=True), x[4:], y[4:], index[4:])
    inside = ((x[4:] * 255 - 6 >= 0) & (x[4:] * 255 + 6 <= 255))
    assert signed[inside].abs().eq(6).all()


# --------------------------------------------------------------------------- LSP
def test_lsp_patches_budgets_and_class_structure():
    gen = LinearSeparableNoise(num_classes=10, epsilon=8, l2_epsilon=6, patch_size=4, seed=3)
    n = 300
    y, index = torch.arange(n) % 10, torch.arange(n) * 7
    raw = gen.patterns(y, index, (3, 16, 16))
    # constant 4x4 patches, scaled to the reference's L2 norm (6/255) * sqrt(C*H*W)
    blocks = raw.view(n, 3, 4, 4, 4, 4)
    assert torch.allclose(blocks, blocks[:, :, :, :1, :, :1].expand_as(blocks))
    assert torch.allclose(raw.flatten(1).norm(dim=1), torch.full((n,), 6 / 255 * (3 * 16 * 16) ** 0.5))
    x = torch.full((n, 3, 16, 16), 0.5)
    delta = _quantized(gen, x, y, index)
    assert delta.abs().max() <= 8
    flat = delta.flatten(1).float()
    centres = torch.stack([flat[y == k].mean(0) for k in range(10)])
    assert (torch.cdist(flat, centres).argmin(1) == y).float().mean() > 0.98  # separable by class
    spread = (flat - centres[y]).norm(dim=1).mean()
    assert torch.pdist(centres).min() > spread  # clusters, not one blob
    # deterministic and independent of batching; another seed gives other noise
    assert torch.equal(delta, torch.cat([_quantized(gen, x[:77], y[:77], index[:77]),
                                         _quantized(gen, x[77:], y[77:], index[77:])]))
    again = LinearSeparableNoise(num_classes=10, epsilon=8, l2_epsilon=6, patch_size=4, seed=3)
    assert torch.equal(delta, _quantized(again, x, y, index))
    other = LinearSeparableNoise(num_classes=10, epsilon=8, l2_epsilon=6, patch_size=4, seed=4)
    assert not torch.equal(delta, _quantized(other, x, y, index))


def test_lsp_refuses_codes_too_small_for_the_classes():
    gen = LinearSeparableNoise(num_classes=10, patch_size=8)
    x = torch.rand(2, 1, 8, 8)
    with pytest.raises(ValueError, match="smaller patch_size"):  # one patch, 1 dimension: 2 codes < 10 classes
        gen.generate(x, torch.tensor([0, 1]), torch.tensor([0, 1]))


# --------------------------------------------------------------------------- ue predict
def _check_file(path: Path, method: str, epsilon: int, dm: UEDataModule) -> NoiseFile:
    noise = NoiseFile.open(path)
    noise.check_matches(dm.clean_split("train").fingerprint())
    assert noise.metadata.method == method and noise.metadata.epsilon == epsilon
    assert tuple(noise.delta.shape) == (dm.num_train_samples, *dm.stored_image_shape)
    assert 0 < noise.max_abs() <= epsilon
    clean = dm.clean_split("train").images
    protected = apply_delta(clean, torch.from_numpy(np.array(noise.delta)))
    assert torch.equal(protected.to(torch.int16) - clean.to(torch.int16), torch.from_numpy(np.array(noise.delta)).to(torch.int16))
    return noise


def test_ue_predict_writes_baseline_noise_files(tmp_path, digits_victim):
    """The shipped digits configs, through `ue predict` without --ckpt_path."""
    dm = UEDataModule("digits")
    out = {name: tmp_path / f"{name}.safetensors" for name in ("random", "lsp", "tap")}
    eight = ("--data.resize", "8")  # the 8x8 digits of digits_victim
    def configs(name: str) -> list[str]:
        return [*config_args(*shipped("digits", f"generator/{name}")), "--trainer.callbacks.output", str(out[name])]

    run_ue("predict", *configs("random"), "--data.eval_batch_size", "100", *eight, cwd=tmp_path)
    run_ue("predict", *configs("lsp"), *eight, cwd=tmp_path)
    run_ue("predict", *configs("tap"), *eight, "--model.init_args.classifier_checkpoint", str(digits_victim), "--model.init_args.steps", "2",
           "--model.init_args.step_size", "4", cwd=tmp_path)
    random = _check_file(out["random"], "random", 8, dm)
    x, y, index = _batch(dm, dm.num_train_samples)  # the same seed and indices give the same file, in process
    assert np.array_equal(random.delta, _quantized(RandomNoise(epsilon=8, seed=0), x, y, index).numpy())
    _check_file(out["lsp"], "lsp", 8, dm)
    tap = _check_file(out["tap"], "tap", 8, dm)
    assert tap.metadata.config["classifier_checkpoint"] == str(digits_victim)
