"""Tests for ue_lightning.models: classifier zoo, normalisation, registry, ScoreNet."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from ue_lightning.models import (
    ARCHITECTURES,
    CIFAR10_MEAN,
    CIFAR10_STD,
    ImageClassifier,
    Normalize,
    ScoreNet,
    build_classifier,
)


def _num_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize(("size", "channels"), [(32, 3), (8, 1)])
def test_cifar_form_logits_shape(arch: str, size: int, channels: int) -> None:
    model = build_classifier(arch, num_classes=7, in_channels=channels, image_size=size, width=8)
    assert isinstance(model, ImageClassifier)
    x = torch.rand(2, channels, size, size)
    logits = model(x)
    assert logits.shape == (2, 7)
    assert torch.isfinite(logits).all()
    logits.sum().backward()  # trainable end to end
    assert model.forward_features(x).shape == (2, model.feature_dim)


def test_cifar_form_16px() -> None:
    model = build_classifier("resnet18", num_classes=3, image_size=16, width=8)
    assert model(torch.rand(2, 3, 16, 16)).shape == (2, 3)


@pytest.mark.parametrize(
    ("arch", "size", "channels"),
    [("resnet18", 224, 3), ("vgg16", 128, 1), ("resnet50", 128, 3), ("densenet121", 128, 1), ("wrn34_10", 128, 3),
     ("mobilenet_v2", 128, 1), ("vit", 128, 1)],
)
def test_imagenet_form_logits_shape(arch: str, size: int, channels: int) -> None:
    model = build_classifier(arch, num_classes=5, in_channels=channels, image_size=size).eval()
    assert isinstance(model, ImageClassifier)
    with torch.no_grad():
        assert model(torch.rand(1, channels, size, size)).shape == (1, 5)


def test_imagenet_form_rejects_width() -> None:
    with pytest.raises(ValueError, match="width"):
        build_classifier("resnet18", 10, image_size=224, width=8)


@pytest.mark.parametrize("channels", [3, 1])
def test_normalisation_is_first_layer(channels: int) -> None:
    model = build_classifier("resnet18", 10, in_channels=channels, width=8).eval()
    if channels == 3:
        mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    else:
        mean = torch.full((1, 1, 1, 1), 0.5)
        std = torch.full((1, 1, 1, 1), 0.5)
    x = torch.rand(4, channels, 16, 16)
    with torch.no_grad():
        expected = model.head(model.backbone((x - mean) / std))
        torch.testing.assert_close(model(x), expected)


def test_classifiers_run_channels_last_with_the_same_input_gradient() -> None:
    """Weights and the batch the backbone sees are channels-last (oneDNN's faster layout; weight gradients keep
    the weights' strides, as DDP's buckets expect), and an attack's input gradient equals the one through
    the NCHW layout up to float rounding."""
    model = build_classifier("resnet18", 10, in_channels=3, width=16).eval()
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.in_channels > 1)
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) and not conv.weight.is_contiguous()
    seen = []
    model.backbone.register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    x, y = torch.rand(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    delta = torch.zeros_like(x).requires_grad_(True)
    (grad,) = torch.autograd.grad(torch.nn.functional.cross_entropy(model(x + delta), y), delta)
    assert seen[0].is_contiguous(memory_format=torch.channels_last) and not seen[0].is_contiguous()
    nchw = build_classifier("resnet18", 10, in_channels=3, width=16).eval()
    nchw.load_state_dict(model.state_dict())
    nchw.to(memory_format=torch.contiguous_format)
    delta_nchw = torch.zeros_like(x).requires_grad_(True)
    logits = nchw.head(nchw.backbone(nchw.normalize(x + delta_nchw)))
    (grad_nchw,) = torch.autograd.grad(torch.nn.functional.cross_entropy(logits, y), delta_nchw)
    torch.testing.assert_close(grad, grad_nchw, rtol=1e-4, atol=1e-6)


def test_custom_mean_std_and_buffers() -> None:
    model = build_classifier("vgg16", 10, width=8, mean=(0.1, 0.2, 0.3), std=0.5)
    torch.testing.assert_close(model.normalize.mean.flatten(), torch.tensor([0.1, 0.2, 0.3]))
    torch.testing.assert_close(model.normalize.std.flatten(), torch.full((3,), 0.5))
    assert "normalize.mean" in model.state_dict()
    with pytest.raises(ValueError):
        Normalize(mean=(0.5, 0.5), std=0.5, in_channels=3)


def test_unknown_arch_lists_choices() -> None:
    with pytest.raises(ValueError) as err:
        build_classifier("alexnet", 10)
    for name in ARCHITECTURES:
        assert name in str(err.value)


def test_full_width_parameter_counts() -> None:
    resnet18 = _num_params(build_classifier("resnet18", 10))
    assert 11.0e6 <= resnet18 <= 11.3e6, resnet18
    wrn = _num_params(build_classifier("wrn34_10", 10))
    assert 46.0e6 <= wrn <= 46.4e6, wrn
    mobilenet = _num_params(build_classifier("mobilenet_v2", 10))
    assert 2.2e6 <= mobilenet <= 2.3e6, mobilenet  # torchvision's features (2.22M) and a 1280 x 10 head
    vit = _num_params(build_classifier("vit", 10))
    assert 3.1e6 <= vit <= 3.3e6, vit  # 6 layers of 4 x 256^2 (attention) + 2 x 256 x 512 (MLP), and the rest


def test_vit_takes_its_own_size_and_refuses_one_its_patches_do_not_tile() -> None:
    model = build_classifier("vit", 10, image_size=24, width=32)
    assert model(torch.rand(2, 3, 24, 24)).shape == (2, 10)
    with pytest.raises(ValueError, match="multiple of its patch size 4"):
        build_classifier("vit", 10, image_size=30)
    with pytest.raises(ValueError, match="width 100 must be a multiple of its 3 heads"):
        build_classifier("vit", 10, image_size=32, width=100)


def test_mobilenet_v2_cifar_form_downsamples_32_px_to_4() -> None:
    """The CIFAR strides: 8x downsampling (torchvision's ImageNet form: 32x, which leaves 1x1 of a 32 px image)."""
    model = build_classifier("mobilenet_v2", 10, image_size=32, width=8)
    assert model.backbone.features(torch.rand(1, 3, 32, 32)).shape[-2:] == (4, 4)


@pytest.mark.parametrize(("size", "channels", "num_sigmas"), [(32, 3, 1), (8, 1, 4)])
def test_score_net_shape_and_conditioning(size: int, channels: int, num_sigmas: int) -> None:
    net = ScoreNet(channels, num_classes=10, image_size=size, width=16, num_sigmas=num_sigmas)
    x = torch.rand(3, channels, size, size)
    sigma = torch.tensor([0, 1, 3]) if num_sigmas > 1 else None
    y0 = torch.zeros(3, dtype=torch.long)
    y1 = torch.full((3,), 5, dtype=torch.long)
    out0 = net(x, y0, sigma)
    assert out0.shape == x.shape
    assert not torch.allclose(out0, net(x, y1, sigma))
    if num_sigmas > 1:
        assert not torch.allclose(out0, net(x, y0, torch.tensor([2, 2, 2])))
        with pytest.raises(ValueError):
            net(x, y0)
    out0.square().mean().backward()
    assert net.label_emb.weight.grad is not None


def test_score_net_soft_labels_match_hard() -> None:
    net = ScoreNet(3, num_classes=4, image_size=16, width=16)
    x = torch.rand(2, 3, 16, 16)
    y = torch.tensor([1, 3])
    soft = torch.nn.functional.one_hot(y, 4).float()
    torch.testing.assert_close(net(x, y), net(x, soft))


@pytest.mark.parametrize("size", [16, 32])
@pytest.mark.parametrize("channels", [1, 3])
def test_airbench_logits_shape(size: int, channels: int) -> None:
    model = build_classifier("airbench", num_classes=10, in_channels=channels, image_size=size, width=8)
    logits = model(torch.rand(4, channels, size, size))
    assert logits.shape == (4, 10) and torch.isfinite(logits).all()
    assert model.feature_dim == 32  # 4 x width
    logits.sum().backward()
    whiten = model.backbone.whiten.conv
    assert whiten.weight.shape == (8 * channels, channels, 2, 2) and whiten.weight.grad is None
    assert whiten.bias.grad is not None


def test_airbench_default_width_and_frozen_parameters() -> None:
    model = build_classifier("airbench", 10)
    assert model.feature_dim == 256  # airbench's 64, 256, 256
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    assert "backbone.whiten.conv.weight" in frozen and "backbone.whiten.conv.bias" not in frozen
    assert all(name.endswith(".weight") for name in frozen)  # whitening filters and BatchNorm scales only
    assert model.head.bias is None


@pytest.mark.parametrize("channels", [1, 3])
def test_patch_whitening_decorrelates_patches(channels: int) -> None:
    from ue_lightning.models import PatchWhitening

    mix = torch.randn(4 * channels, 4 * channels)
    # correlated patches: smooth images (a blurred field times a random channel mix)
    x = torch.nn.functional.avg_pool2d(torch.randn(64, channels, 33, 33), 2, stride=1)
    x = torch.einsum("dc,bchw->bdhw", mix[:channels, :channels], x)
    layer = PatchWhitening(channels)
    assert not layer.fitted
    layer.fit(PatchWhitening.patch_covariance(x))
    assert layer.fitted
    with torch.no_grad():
        out = layer(x) - layer.conv.bias.view(1, -1, 1, 1)
    half = out[:, : 4 * channels].permute(0, 2, 3, 1).reshape(-1, 4 * channels)
    cov = torch.cov(half.T)
    variances = torch.linalg.eigvalsh(PatchWhitening.patch_covariance(x))
    expected = variances / (variances + layer.eps)  # unit variance, shrunk where the variance is tiny
    torch.testing.assert_close(cov.diag().sort().values, expected.sort().values, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(cov - torch.diag(cov.diag()), torch.zeros_like(cov), atol=1e-3, rtol=0)
    torch.testing.assert_close(out[:, 4 * channels:], -out[:, : 4 * channels])  # both signs


def test_patch_whitening_refuses_a_wrong_covariance() -> None:
    from ue_lightning.models import PatchWhitening

    with pytest.raises(ValueError, match="12x12"):
        PatchWhitening(3).fit(torch.eye(4))


def test_one_channel_classifiers_keep_nchw_weights() -> None:
    """oneDNN's weight gradient of a channels-last (w, 1, k, k) weight corrupted the heap at 2 threads: the
    one-channel models (the digits) keep NCHW weights."""
    model = build_classifier("resnet18", 10, in_channels=1, image_size=16, width=4)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs[0].in_channels == 1
    assert all(conv.weight.is_contiguous() for conv in convs)


@pytest.mark.parametrize("arch, width, channels_last", [
    ("resnet18", 4, False), ("resnet18", 8, False), ("resnet18", 16, True), ("resnet50", 4, True),
    ("wrn34_10", 8, False), ("vgg16", 4, True)])
def test_narrow_strided_pointwise_convolutions_keep_nchw(arch, width, channels_last) -> None:
    """oneDNN 3.12 corrupts the heap in the weight gradient of a strided 1x1 convolution over a channels-last
    input with < 16 input channels (a width-4/8 ResNet-18's shortcut): such models keep NCHW weights, and
    their batches are made NCHW even when they arrive channels-last."""
    model = build_classifier(arch, 10, in_channels=3, width=width)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert model.channels_last is channels_last
    assert all(conv.weight.is_contiguous() for conv in convs) is not channels_last
    seen = []
    model.backbone.register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    model(torch.rand(2, 3, 16, 16).contiguous(memory_format=torch.channels_last))
    assert seen[0].is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def test_narrow_model_trains_without_corrupting_the_heap() -> None:
    """The width-4 ResNet-18 of the tests, trained at one thread: channels-last, its shortcut's weight gradient
    aborted the process within a few steps ("double free or corruption") or hung it at two threads."""
    script = (
        "import torch\n"
        "from ue_lightning.models import build_classifier\n"
        "torch.set_num_threads(1); torch.manual_seed(0)\n"
        "model = build_classifier('resnet18', 10, in_channels=3, width=4)\n"
        "for _ in range(30):\n"
        "    x = torch.rand(32, 3, 16, 16).contiguous(memory_format=torch.channels_last)\n"
        "    model(x).logsumexp(1).sum().backward()\n"
        "print('trained')\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "trained" in proc.stdout, proc.stderr[-2000:]


def test_in_mode_restores_the_mode_and_the_gradient_flags_even_after_an_error():
    import pytest
    import torch

    from ue_lightning.models import in_mode

    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    net.train()
    net[0].bias.requires_grad_(False)
    with pytest.raises(RuntimeError, match="inside"):
        with in_mode(net, False, frozen=True):
            assert not net.training and not any(p.requires_grad for p in net.parameters())
            raise RuntimeError("inside")
    assert net.training and net[0].weight.requires_grad and not net[0].bias.requires_grad
