"""Defences a data thief would try: what each does to an image, that only train images get it, one victim step each."""

from __future__ import annotations

import math
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from conftest import REPO
from ue_lightning.data import UEDataModule
from ue_lightning.data import NoiseFile, NoiseMetadata, protected_mask
from ue_lightning.data.defences import DEFENCES, BatchAugment, BatchMix, BitDepth, Cutout, Jpeg, build_defence, grayscale
from ue_lightning.lightning_cli import build_cli
from ue_lightning.modules import ScoreEstimator, VictimClassifier
from ue_lightning.data.purification import PurifiedImages, label_blind, tweedie_denoise


def smooth_image(size: int = 32) -> torch.Tensor:
    """A uint8 (3, size, size) image with gradients and a little texture, like a natural one."""
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    image = torch.stack([xx, yy, (xx + yy) / 2]) * 200 + 20 + 20 * torch.sin(12 * xx)
    return image.clamp(0, 255).to(torch.uint8)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB of two uint8 images."""
    return 10 * math.log10(255 ** 2 / (a.float() - b.float()).pow(2).mean().item())


def squeeze(name: str, image: torch.Tensor) -> torch.Tensor:
    return v2.Compose(build_defence(name, dataset="cifar10", image_size=32, num_classes=10).squeeze)(image)


def test_jpeg_is_lossy_but_close():
    image = smooth_image()
    low, high = squeeze("jpeg10", image), squeeze("jpeg50", image)
    assert low.dtype == torch.uint8 and low.shape == image.shape
    assert not torch.equal(low, image) and not torch.equal(high, image)
    assert 25 < psnr(low, image) < psnr(high, image) < 50  # measured: 30.9 and 39.5 dB
    assert torch.equal(squeeze("jpeg10", image), low)  # deterministic
    grey = image[:1]
    assert Jpeg(10)(grey).shape == grey.shape and 20 < psnr(Jpeg(10)(grey), grey) < 50


def test_grayscale_gives_equal_channels_and_keeps_grey_images():
    out = squeeze("grayscale", smooth_image())
    assert out.shape == (3, 32, 32) and torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])
    grey = smooth_image()[:1]
    assert torch.equal(grayscale(grey), grey)


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_bit_depth_keeps_at_most_two_to_the_bits_levels(bits):
    image = torch.arange(256, dtype=torch.uint8).view(1, 16, 16)
    out = BitDepth(bits)(image)
    levels = out.unique()
    assert len(levels) == 2 ** bits and levels[0] == 0 and levels[-1] == 255
    assert (out.float() - image.float()).abs().max() <= 255 / (2 ** bits - 1) / 2 + 1  # rounding, not truncation
    assert squeeze("bitdepth", smooth_image()).unique().numel() <= 16  # the preset: 4 bits


def test_gaussian_smoothing_removes_pixel_noise_and_keeps_flat_images():
    """A +-8/255 checkerboard (the finest pattern noise can take) nearly vanishes under the 3x3 blur of sigma 0.8; a
    flat image is unchanged; a smooth image stays close (the blur is low-pass)."""
    flat = torch.full((3, 32, 32), 120, dtype=torch.uint8)
    checker = (torch.arange(32).view(1, -1) + torch.arange(32).view(-1, 1)) % 2 * 16 - 8
    noised = (flat.int() + checker).to(torch.uint8)
    out = squeeze("gaussian", noised)
    assert out.dtype == torch.uint8 and out.shape == noised.shape
    assert torch.equal(squeeze("gaussian", flat), flat)
    residual = out.int()[:, 1:-1, 1:-1] - 120  # inside the border
    assert residual.abs().max() <= 2 < (noised.int() - 120).abs().max()  # measured: 1 against 8
    image = smooth_image()
    assert psnr(squeeze("gaussian", image), image) > 30


def test_iss_is_grayscale_then_jpeg10():
    image = smooth_image()
    out = squeeze("iss", image)
    assert torch.equal(out, Jpeg(10)(grayscale(image)))
    assert (out.int()[0] - out.int()[1]).abs().max() <= 2  # grey in, (almost) grey out of the JPEG codec


def test_cutout_zeroes_one_square_of_the_stated_size():
    torch.manual_seed(0)
    areas = set()
    for _ in range(200):
        out = Cutout(16)(torch.ones(3, 32, 32))
        zero = out[0] == 0
        assert torch.equal(zero, out[2] == 0)  # the same square on every channel
        rows, cols = zero.any(1).nonzero().flatten(), zero.any(0).nonzero().flatten()
        h, w = len(rows), len(cols)
        assert 8 <= h <= 16 and 8 <= w <= 16 and zero.sum() == h * w  # a rectangle, clipped at the border
        assert rows[-1] - rows[0] + 1 == h and cols[-1] - cols[0] + 1 == w
        areas.add(h * w)
    assert max(areas) == 256  # centred away from the border: the full 16x16 square
    assert build_defence("cutout", dataset="cifar100", image_size=32, num_classes=100).augment[0].size == 8


def _constant_batch(n: int = 8) -> list[tuple[torch.Tensor, int, int]]:
    """Samples whose image i is the constant (i + 1) / 10 and whose label is i."""
    return [(torch.full((3, 8, 8), (i + 1) / 10), i, 100 + i) for i in range(n)]


def test_cutmix_label_weights_are_the_pasted_areas():
    torch.manual_seed(0)
    mix = build_defence("cutmix", dataset="cifar10", image_size=8, num_classes=10).batch
    assert mix.p == 0.5
    mix.p = 1.0
    for _ in range(10):
        x, soft, index = mix(_constant_batch())
        assert soft.shape == (8, 10) and torch.allclose(soft.sum(1), torch.ones(8))
        assert torch.equal(index, torch.arange(100, 108))
        for i in range(8):
            own = torch.isclose(x[i], torch.tensor((i + 1) / 10)).float().mean()
            other = torch.isclose(x[i], torch.tensor(((i - 1) % 8 + 1) / 10)).float().mean()
            assert soft[i, i] == pytest.approx(own.item(), abs=1e-6)
            assert soft[i, (i - 1) % 8] == pytest.approx(other.item(), abs=1e-6)


def test_mixup_label_weights_are_the_pixel_weights():
    torch.manual_seed(0)
    mix = build_defence("mixup", dataset="cifar10", image_size=8, num_classes=10).batch
    x, soft, _ = mix(_constant_batch())
    assert torch.allclose(soft.sum(1), torch.ones(8)) and (soft > 0).sum(1).le(2).all()
    for i in range(8):  # pixel = w_i * (i + 1) / 10 + w_j * (j + 1) / 10, the weights those of the labels
        expected = sum(soft[i, j] * (j + 1) / 10 for j in range(8))
        assert torch.allclose(x[i], expected.expand_as(x[i]), atol=1e-6)


def test_adversarial_training_takes_soft_targets():
    torch.manual_seed(0)
    model = VictimClassifier(arch="resnet18", num_classes=10, in_channels=3, image_size=8, width=4, adv_radius=4,
                             adv_steps=2)
    x, soft, _ = build_defence("mixup", dataset="cifar10", image_size=8, num_classes=10).batch(_constant_batch())
    assert 0 < (model.adversarial(x, soft) - x).abs().max() <= 4 / 255 + 1e-6


def test_unmixed_cutmix_batch_has_one_hot_targets():
    x, soft, _ = BatchMix(v2.CutMix(alpha=1.0, num_classes=10), 10, p=0.0)(_constant_batch())
    assert torch.equal(soft, torch.eye(10)[:8]) and torch.equal(x[3], torch.full((3, 8, 8), 0.4))


def test_ueraser_is_the_references_kornia_chain_drawn_for_each_image_of_the_batch():
    """lafeat/ueraser's UEraser: kornia's plasma brightness, plasma contrast, channel shuffle (each p 0.5) and
    TrivialAugment, applied to the collated batch with a draw per image."""
    defence = build_defence("ueraser", dataset="cifar10", image_size=16, num_classes=10)
    assert isinstance(defence.batch, BatchAugment) and not defence.mixes_labels and defence.augment == []
    chain = list(defence.batch.augment.children())
    assert [type(op).__name__ for op in chain] == ["RandomPlasmaBrightness", "RandomPlasmaContrast",
                                                   "RandomChannelShuffle", "TrivialAugment"]
    assert [op.p for op in chain[:3]] == [0.5, 0.5, 0.5]
    torch.manual_seed(0)
    image = torch.rand(3, 16, 16)
    for channels in (3, 1):  # RGB and grey datasets
        x, y, index = defence.batch([(image[:channels], 7, i) for i in range(8)])
        assert x.shape == (8, channels, 16, 16) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
        assert torch.equal(y, torch.full((8,), 7)) and torch.equal(index, torch.arange(8))
        assert len({tuple(v.flatten().tolist()) for v in x}) == 8  # one image, eight draws
        assert sum(torch.equal(v, image[:channels]) for v in x) < 8


def test_ueraser_max_serves_five_views_and_trains_on_each_images_worst(fake_npz):
    torch.manual_seed(0)
    dm = UEDataModule("npz", root=str(fake_npz), batch_size=4, defence="ueraser-max")
    dm.setup("fit")
    views, y, _ = next(iter(dm.train_dataloader()))
    assert views.shape == (4, 5, 3, 16, 16) and 0 <= views.min() and views.max() <= 1
    assert not torch.equal(views[:, 0], views[:, 1])  # independent draws of the augmentation
    assert next(iter(dm.test_dataloader()))[0].ndim == 4
    model = VictimClassifier(arch="resnet18", num_classes=10, in_channels=3, image_size=16, width=4,
                             worst_view_fraction=0.5)
    model.eval()  # BatchNorm in eval mode: a view's logits do not depend on the other views
    per_view = torch.stack([F.cross_entropy(model(views[:, v]), y, reduction="none") for v in range(5)])
    model._trainer = SimpleNamespace(global_step=4, estimated_stepping_batches=10)  # 40% of the steps: worst view
    logits, loss = model.views_loss(views, y)
    assert torch.allclose(loss, per_view.max(0).values.mean()) and torch.allclose(logits, model(views[:, 0]))
    assert loss > per_view.mean() + 1e-4  # not the mean over views
    model._trainer = SimpleNamespace(global_step=5, estimated_stepping_batches=10)  # then the first view alone
    assert torch.allclose(model.views_loss(views, y)[1], per_view[0].mean())
    with pytest.raises(ValueError, match="adversarially"):
        VictimClassifier(arch="resnet18", image_size=16, width=4, adv_radius=4).views_loss(views, y)
    with pytest.raises(ValueError, match="worst_view_fraction"):
        VictimClassifier(worst_view_fraction=1.5)


def test_defence_reaches_train_images_only(fake_npz):
    """The defence transforms the train batches; the held-out share (val), the test and the predict images
    are served as they are."""
    dm = UEDataModule("npz", root=str(fake_npz), batch_size=12, defence="grayscale", val_fraction=0.25)
    dm.setup("fit")
    x, _, _ = next(iter(dm.train_dataloader()))
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 1], x[:, 2])
    for loader in (dm.test_dataloader(), dm.val_dataloader(), dm.predict_dataloader()):
        x, y, _ = next(iter(loader))
        assert not torch.equal(x[:, 0], x[:, 1]) and y.dtype == torch.int64
    assert "defence grayscale" in dm.describe()
    mixed = UEDataModule("npz", root=str(fake_npz), batch_size=12, defence="mixup")
    mixed.setup("fit")
    _, y, _ = next(iter(mixed.train_dataloader()))
    assert y.shape == (12, 10) and y.is_floating_point()
    assert next(iter(mixed.test_dataloader()))[1].shape == (12,)


def test_label_mixing_needs_a_model_that_takes_soft_targets(fake_npz):
    dm = UEDataModule("npz", root=str(fake_npz), defence="cutmix")
    dm.setup("fit")
    dm.trainer = SimpleNamespace(lightning_module=L.LightningModule())
    with pytest.raises(ValueError, match="soft targets"):
        dm.train_dataloader()
    views = UEDataModule("npz", root=str(fake_npz), defence="ueraser-max")
    views.setup("fit")
    views.trainer = dm.trainer
    with pytest.raises(ValueError, match="views of each train image"):
        views.train_dataloader()
    with pytest.raises(ValueError, match="choose one of"):
        UEDataModule("npz", defence="jpeg")


@pytest.mark.parametrize("defence", DEFENCES)
def test_victim_trains_a_step_under_each_defence(fake_npz, defence):
    torch.manual_seed(0)
    dm = UEDataModule("npz", root=str(fake_npz), batch_size=8, defence=defence)
    model = VictimClassifier(arch="resnet18", num_classes=10, in_channels=3, image_size=16, width=4, lr=0.01)
    trainer = L.Trainer(accelerator="cpu", max_steps=1, limit_val_batches=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, dm)
    assert trainer.global_step == 1 and math.isfinite(trainer.callback_metrics["train/loss"].item())


def test_cli_takes_the_defence_by_name(capsys):
    args = ["fit", "--config", str(REPO / "configs/victim/digits.yaml"), "--data.defence", "iss", "--print_config"]
    with pytest.raises(SystemExit) as done:
        build_cli(args)
    assert done.value.code == 0 and "defence: iss" in capsys.readouterr().out
    with pytest.raises(SystemExit) as refused:
        build_cli(args[:4] + ["jpeg", "--print_config"])
    assert refused.value.code != 0 and "jpeg10" in capsys.readouterr().err


def test_purification_rounds_shrink_what_the_model_does_not_expect_and_one_round_is_the_one_step_form():
    """Data N(128/255, sigma^2) per pixel: the sigma-smoothed score is -(x - m) / (2 sigma^2), and each round of
    noise and Tweedie denoising halves a +-16/255 pattern on top (plus fresh noise): 8/255 left after one round,
    2/255 after three; with no score, three rounds add noise of std sigma * sqrt(3)."""
    sigma, m = 0.1, 128 / 255
    sign = (torch.arange(16).view(1, -1) + torch.arange(16).view(-1, 1)) % 2 * 2 - 1
    images = (128 + 16 * sign).expand(6, 3, 16, 16).to(torch.uint8)
    labels, indices = torch.zeros(6, dtype=torch.int64), torch.arange(6)
    gaussian = lambda x, y: -(x - m) / (2 * sigma ** 2)  # noqa: E731

    def left(steps: int) -> float:  # the pattern's amplitude left, 1/255 units
        out = tweedie_denoise(images, labels, indices, gaussian, sigma, seed=0, steps=steps)
        return ((out.float() - 128) * sign).mean().item()

    assert abs(left(1) - 8) < 1 and abs(left(3) - 2) < 1
    assert torch.equal(tweedie_denoise(images, labels, indices, gaussian, sigma, seed=0),
                       tweedie_denoise(images, labels, indices, gaussian, sigma, seed=0, steps=1))
    grey = torch.full((6, 3, 16, 16), 128, dtype=torch.uint8)
    zero = lambda x, y: torch.zeros_like(x)  # noqa: E731
    noisy = tweedie_denoise(grey, labels, indices, zero, sigma, seed=1, steps=3)
    assert abs((noisy.float() - 128).std().item() - sigma * 255 * 3 ** 0.5) < 2.0
    with pytest.raises(ValueError, match="purify_steps=0 must be at least 1"):
        tweedie_denoise(grey, labels, indices, zero, sigma, seed=1, steps=0)


def test_tweedie_denoise_returns_each_class_image_under_its_exact_score():
    # Each class is one image x0[y]: p_sigma(x | y) = N(x0[y], sigma^2 I), score -(x - x0[y]) / sigma^2, and one
    # Tweedie step lands on x0[y] exactly, whatever the perturbation and the noise drawn.
    sigma, g = 0.1, torch.Generator().manual_seed(0)
    x0 = torch.randint(40, 216, (3, 3, 8, 8), generator=g, dtype=torch.uint8)
    labels = torch.tensor([0, 1, 2, 1])
    protected = (x0[labels].short() + torch.randint(-8, 9, (4, 3, 8, 8), generator=g)).clamp(0, 255).to(torch.uint8)
    exact = lambda x, y: -(x - x0[y].float() / 255) / sigma ** 2  # noqa: E731
    out = tweedie_denoise(protected, labels, torch.arange(4), exact, sigma, seed=0)
    assert out.dtype == torch.uint8 and (out.short() - x0[labels].short()).abs().max() <= 1
    # with no score it is the noisy image: noise of std sigma, a function of (seed, index) only
    grey = torch.full((6, 3, 16, 16), 128, dtype=torch.uint8)
    zero = lambda x, y: torch.zeros_like(x)  # noqa: E731
    whole = tweedie_denoise(grey, torch.zeros(6, dtype=torch.int64), torch.arange(6), zero, sigma, seed=1)
    assert abs((whole.float() - 128).std().item() - sigma * 255) < 1.0
    halves = [tweedie_denoise(grey[:3], torch.zeros(3, dtype=torch.int64), i, zero, sigma, seed=1)
              for i in (torch.arange(3), torch.arange(3, 6))]
    assert torch.equal(torch.cat(halves), whole)
    assert not torch.equal(tweedie_denoise(grey, torch.zeros(6, dtype=torch.int64), torch.arange(6), zero, sigma,
                                           seed=2), whole)
    # label-blind: the class-conditional score averaged over the classes, whatever label is given
    blind = label_blind(exact, 3)
    x = protected.float() / 255
    assert torch.allclose(blind(x, labels), blind(x, torch.zeros(4, dtype=torch.int64)))
    assert torch.allclose(blind(x, labels), sum(exact(x, torch.full((4,), k)) for k in range(3)) / 3)
    with pytest.raises(ValueError, match="uint8"):
        tweedie_denoise(grey.float(), torch.zeros(6, dtype=torch.int64), torch.arange(6), zero, sigma, seed=1)


def test_purify_with_denoises_the_published_train_images_once(fake_npz, tmp_path):
    score = ScoreEstimator(num_classes=10, in_channels=3, image_size=16, width=4, sigma=0.1)
    checkpoint = tmp_path / "score.ckpt"
    torch.save({"hyper_parameters": dict(score.hparams), "state_dict": score.state_dict()}, checkpoint)
    dm = UEDataModule("npz", root=str(fake_npz), batch_size=8, eval_batch_size=7, augment=False,
                      train_subset=30, perturbation=str(tmp_path / "n.safetensors"), protected_fraction=0.5,
                      purify_with=str(checkpoint))
    train = dm.clean_split("train")
    delta = torch.full(train.images.shape, 8, dtype=torch.int8)
    NoiseFile.write(tmp_path / "n.safetensors", delta,
                    NoiseMetadata(method="t", epsilon=8, classwise=False, fingerprint=train.fingerprint()))
    dm.setup("fit")
    indices = dm.victim_indices()
    mask = protected_mask(len(train), dm.train_indices(), 0.5, seed=0)[indices]
    assert 0 < mask.sum() < len(mask)
    published = train.images[indices].short() + 8 * mask[:, None, None, None]
    expected = tweedie_denoise(published.clamp(0, 255).to(torch.uint8), train.targets[indices], indices,
                               label_blind(score.score, 10), 0.1, seed=0)
    served = torch.stack([dm.train_set[i][0] for i in range(len(indices))])
    assert torch.allclose(served, expected.float() / 255)  # noise first, then purified, in batches of 7
    assert not torch.equal(expected, published.clamp(0, 255).to(torch.uint8))
    assert torch.allclose(next(iter(dm.test_dataloader()))[0][0], dm.clean_split("test").images[0].float() / 255)
    assert "purified with" in dm.describe() and "blind labels" in dm.describe()
    with pytest.raises(ValueError, match="'blind' or 'own'"):
        UEDataModule("npz", root=str(fake_npz), purify_with=str(checkpoint), purify_labels="mean")
    model = VictimClassifier(arch="resnet18", num_classes=10, in_channels=3, image_size=16, width=4)
    trainer = L.Trainer(accelerator="cpu", max_steps=1, limit_val_batches=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, UEDataModule("npz", root=str(fake_npz), batch_size=8, purify_with=str(checkpoint),
                                    defence="jpeg50"))  # on the trainer's device, then a defence
    assert trainer.global_step == 1 and isinstance(trainer.datamodule.train_set.dataset.base, PurifiedImages)
    other = ScoreEstimator(num_classes=2, in_channels=3, image_size=16, width=4)
    torch.save({"hyper_parameters": dict(other.hparams), "state_dict": other.state_dict()}, tmp_path / "other.ckpt")
    for path, match in ((tmp_path / "other.ckpt", "num_classes=2 in the checkpoint but 10"),
                        (tmp_path / "missing.ckpt", "does not exist.*configs/score/dsm.yaml")):
        with pytest.raises(ValueError, match=match):
            UEDataModule("npz", root=str(fake_npz), purify_with=str(path)).setup("fit")
