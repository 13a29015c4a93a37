"""Small-image ("CIFAR") classifiers: 3x3 stem, no stem max-pool, global average pool.

All networks accept any input of at least 8x8 pixels (tested at 8, 16, 32; fine
up to 64 and beyond) with ``in_channels`` channels, and end with adaptive average
pooling, so the head size does not depend on the image size.

``width`` always means *the number of channels of the first stage*; later stages
scale proportionally, so ``width`` is a single knob for tiny test models:

* VGG-16-BN: blocks have ``w, 2w, 4w, 8w, 8w`` channels (default ``w = 64``).
* ResNet-18 / ResNet-50: stem and stages ``w, 2w, 4w, 8w`` (bottleneck
  outputs are 4x that; default ``w = 64``).
* DenseNet-121: ``w`` is the stem width, equal to ``2 * growth_rate``
  (default ``w = 64``, growth 32); all dense layers scale with the growth rate.
* WRN-34-10: stages ``w, 2w, 4w`` (default ``w = 16 * 10 = 160``); the stem
  has ``min(16, w)`` channels, as in the paper at full width.
* MobileNet-V2: torchvision's network at ``width_mult = w / 32`` (``w`` the stem's
  channels, default 32; the last 1x1 convolution keeps its 1280), with the two changes
  the CIFAR versions make: stem and first 24-channel block at stride 1 (8x downsampling).

The ``*Backbone`` classes output pooled features ``(B, out_features)``; the
``cifar_*`` factories wrap them with :class:`Normalize` and a linear head into
an :class:`ImageClassifier` taking pixels in ``[0, 1]``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from .normalize import ImageClassifier, Normalize, conv_with_inputs


def _conv3x3(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=stride, padding=1, bias=False)


def _conv1x1(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel_size=1, stride=stride, bias=False)


def _init_weights(module: nn.Module) -> None:
    """He-normal convs, unit/zero BatchNorm, default Linear."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _pool_flatten() -> nn.Sequential:
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))


# --------------------------------------------------------------------------- VGG


class VGG16BNBackbone(nn.Module):
    """VGG-16 with BatchNorm: 13 conv layers in 5 blocks, each followed by 2x2 max-pool.

    Max-pools use ``ceil_mode`` so 8x8 inputs (which reach 1x1 after three
    pools) still work. Output: ``(B, 8 * width)``.
    """

    BLOCKS: tuple[tuple[int, int], ...] = ((1, 2), (2, 2), (4, 3), (8, 3), (8, 3))  # (width mult, convs)

    def __init__(self, in_channels: int = 3, width: int = 64) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        ch = in_channels
        for mult, n_convs in self.BLOCKS:
            out = width * mult
            for _ in range(n_convs):
                layers += [_conv3x3(ch, out), nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
                ch = out
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=True))
        self.features = nn.Sequential(*layers)
        self.pool = _pool_flatten()
        self.out_features = ch
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.features(x))


# ------------------------------------------------------------------------ ResNet


class BasicBlock(nn.Module):
    """Two 3x3 convs with identity (or 1x1 projection) shortcut. ``out = planes``."""

    expansion = 1

    def __init__(self, in_ch: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out = planes * self.expansion
        self.conv1 = _conv3x3(in_ch, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, out)
        self.bn2 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out:
            self.shortcut = nn.Sequential(_conv1x1(in_ch, out, stride), nn.BatchNorm2d(out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.relu(self.bn1(self.conv1(x)))
        h = self.bn2(self.conv2(h))
        return self.relu(h + self.shortcut(x))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided), 1x1 expand to ``4 * planes``; projection shortcut if needed."""

    expansion = 4

    def __init__(self, in_ch: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out = planes * self.expansion
        self.conv1 = _conv1x1(in_ch, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = _conv1x1(planes, out)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out:
            self.shortcut = nn.Sequential(_conv1x1(in_ch, out, stride), nn.BatchNorm2d(out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.relu(self.bn1(self.conv1(x)))
        h = self.relu(self.bn2(self.conv2(h)))
        h = self.bn3(self.conv3(h))
        return self.relu(h + self.shortcut(x))


class ResNetBackbone(nn.Module):
    """CIFAR ResNet: 3x3 stem (stride 1, no max-pool) and four stages.

    Stage ``i`` has ``width * 2**i`` planes and stride ``1, 2, 2, 2``.
    Output: ``(B, 8 * width * block.expansion)``.
    """

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: Sequence[int],
        in_channels: int = 3,
        width: int = 64,
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(_conv3x3(in_channels, width), nn.BatchNorm2d(width), nn.ReLU(inplace=True))
        ch = width
        stages: list[nn.Module] = []
        for i, n_blocks in enumerate(layers):
            planes = width * 2**i
            blocks: list[nn.Module] = []
            for j in range(n_blocks):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(block(ch, planes, stride))
                ch = planes * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.pool = _pool_flatten()
        self.out_features = ch
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        h = self.layer4(self.layer3(self.layer2(self.layer1(h))))
        return self.pool(h)


# ---------------------------------------------------------------------- DenseNet


class DenseLayer(nn.Module):
    """BN-ReLU-1x1(4k)-BN-ReLU-3x3(k); output is ``cat([x, new], dim=1)`` (+k channels)."""

    def __init__(self, in_ch: int, growth_rate: int) -> None:
        super().__init__()
        inner = 4 * growth_rate
        self.body = nn.Sequential(
            nn.BatchNorm2d(in_ch),
            nn.ReLU(inplace=True),
            _conv1x1(in_ch, inner),
            nn.BatchNorm2d(inner),
            nn.ReLU(inplace=True),
            _conv3x3(inner, growth_rate),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.body(x)], dim=1)


class Transition(nn.Module):
    """BN-ReLU-1x1 conv (compression) then 2x2 average pool (halves H and W)."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.BatchNorm2d(in_ch),
            nn.ReLU(inplace=True),
            _conv1x1(in_ch, out_ch),
            nn.AvgPool2d(kernel_size=2, stride=2, ceil_mode=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class DenseNetBackbone(nn.Module):
    """CIFAR DenseNet-BC: 3x3 stem with ``2 * growth_rate`` channels, dense blocks,
    compression ``reduction`` between blocks, final BN-ReLU and global pool.

    DenseNet-121: ``block_config=(6, 12, 24, 16)``, ``growth_rate=32``.
    Output: ``(B, out_features)`` (1024 at growth 32).
    """

    def __init__(
        self,
        block_config: Sequence[int] = (6, 12, 24, 16),
        growth_rate: int = 32,
        in_channels: int = 3,
        reduction: float = 0.5,
    ) -> None:
        super().__init__()
        ch = 2 * growth_rate
        parts: list[nn.Module] = [_conv3x3(in_channels, ch)]
        for i, n_layers in enumerate(block_config):
            for _ in range(n_layers):
                parts.append(DenseLayer(ch, growth_rate))
                ch += growth_rate
            if i < len(block_config) - 1:
                out = int(math.floor(ch * reduction))
                parts.append(Transition(ch, out))
                ch = out
        parts += [nn.BatchNorm2d(ch), nn.ReLU(inplace=True)]
        self.features = nn.Sequential(*parts)
        self.pool = _pool_flatten()
        self.out_features = ch
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.features(x))


# ------------------------------------------------------------------- Wide ResNet


class PreActBlock(nn.Module):
    """Pre-activation wide block: BN-ReLU-3x3(stride)-BN-ReLU-3x3.

    When the shape changes the 1x1 projection shortcut is applied to the
    pre-activated input (as in Zagoruyko & Komodakis' reference code).
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1, dropout: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_ch)
        self.conv1 = _conv3x3(in_ch, out_ch, stride)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.conv2 = _conv3x3(out_ch, out_ch)
        self.relu = nn.ReLU(inplace=False)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_ch != out_ch:
            self.shortcut = _conv1x1(in_ch, out_ch, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.relu(self.bn1(x))
        h = self.conv1(a)
        h = self.conv2(self.dropout(self.relu(self.bn2(h))))
        skip = x if self.shortcut is None else self.shortcut(a)
        return h + skip


class WideResNetBackbone(nn.Module):
    """Pre-activation Wide ResNet WRN-``depth``-k for small images.

    ``depth = 6 n + 4``; three stages of ``n`` blocks with ``width, 2 width,
    4 width`` channels and strides ``1, 2, 2``. WRN-34-10: ``depth=34``,
    ``width=160`` (= 16 * 10). Stem: 3x3 conv with ``min(16, width)`` channels.
    Output: ``(B, 4 * width)``.
    """

    def __init__(self, depth: int = 34, width: int = 160, in_channels: int = 3, dropout: float = 0.0) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"WRN depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        stem_ch = min(16, width)
        self.stem = _conv3x3(in_channels, stem_ch)
        ch = stem_ch
        stages: list[nn.Module] = []
        for i, stride in enumerate((1, 2, 2)):
            out = width * 2**i
            blocks: list[nn.Module] = []
            for j in range(n):
                blocks.append(PreActBlock(ch, out, stride if j == 0 else 1, dropout))
                ch = out
            stages.append(nn.Sequential(*blocks))
        self.block1, self.block2, self.block3 = stages
        self.final = nn.Sequential(nn.BatchNorm2d(ch), nn.ReLU(inplace=True))
        self.pool = _pool_flatten()
        self.out_features = ch
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.block3(self.block2(self.block1(self.stem(x))))
        return self.pool(self.final(h))


class MobileNetV2Backbone(nn.Module):
    """torchvision's MobileNet-V2 features (random init), CIFAR strides: the stem convolution and the depthwise
    convolution of the first 24-channel block at stride 1 instead of 2, so a 32 px image ends at 4x4 (as the
    CIFAR MobileNet-V2s of the availability-poisoning benchmarks do); then global average pooling."""

    def __init__(self, in_channels: int = 3, width: int = 32):
        super().__init__()
        from torchvision.models import mobilenet_v2

        net = mobilenet_v2(weights=None, width_mult=width / 32)
        if in_channels != 3:
            net.features[0][0] = conv_with_inputs(net.features[0][0], in_channels)
        net.features[0][0].stride = (1, 1)
        net.features[2].conv[1][0].stride = (1, 1)  # the first 24-channel block's depthwise convolution
        self.features = net.features
        self.pool = _pool_flatten()
        self.out_features = net.last_channel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.features(x))


# --------------------------------------------------------------------- factories

MeanStd = float | Sequence[float] | None


def _wrap(backbone: nn.Module, num_classes: int, in_channels: int, mean: MeanStd, std: MeanStd) -> ImageClassifier:
    head = nn.Linear(backbone.out_features, num_classes)  # type: ignore[arg-type]
    return ImageClassifier(backbone, head, Normalize(mean, std, in_channels))


def cifar_vgg16(
    num_classes: int, in_channels: int = 3, width: int = 64, mean: MeanStd = None, std: MeanStd = None
) -> ImageClassifier:
    """VGG-16-BN, CIFAR form; ``width`` = first-block channels (default 64, ~14.7M params)."""
    return _wrap(VGG16BNBackbone(in_channels, width), num_classes, in_channels, mean, std)


def cifar_resnet18(
    num_classes: int, in_channels: int = 3, width: int = 64, mean: MeanStd = None, std: MeanStd = None
) -> ImageClassifier:
    """ResNet-18 (BasicBlock, 2-2-2-2), CIFAR form; ``width`` = first-stage channels (default 64, ~11.2M params)."""
    return _wrap(ResNetBackbone(BasicBlock, (2, 2, 2, 2), in_channels, width), num_classes, in_channels, mean, std)


def cifar_resnet50(
    num_classes: int, in_channels: int = 3, width: int = 64, mean: MeanStd = None, std: MeanStd = None
) -> ImageClassifier:
    """ResNet-50 (Bottleneck, 3-4-6-3), CIFAR form; ``width`` = first-stage planes (default 64, ~23.5M params)."""
    return _wrap(ResNetBackbone(Bottleneck, (3, 4, 6, 3), in_channels, width), num_classes, in_channels, mean, std)


def cifar_densenet121(
    num_classes: int, in_channels: int = 3, width: int = 64, mean: MeanStd = None, std: MeanStd = None
) -> ImageClassifier:
    """DenseNet-121 (6-12-24-16), CIFAR form; ``width`` = stem channels = 2 x growth rate
    (default 64, growth 32, ~7.0M params)."""
    growth = max(1, width // 2)
    return _wrap(DenseNetBackbone((6, 12, 24, 16), growth, in_channels), num_classes, in_channels, mean, std)


def cifar_wrn34_10(
    num_classes: int, in_channels: int = 3, width: int = 160, mean: MeanStd = None, std: MeanStd = None
) -> ImageClassifier:
    """WRN-34-10 (pre-activation), CIFAR form; ``width`` = first-stage channels
    (default 160 = 16 x widen factor 10, ~46.2M params)."""
    return _wrap(WideResNetBackbone(34, width, in_channels), num_classes, in_channels, mean, std)


def cifar_mobilenet_v2(
    num_classes: int, in_channels: int = 3, width: int = 32, mean: MeanStd = None, std: MeanStd = None
) -> ImageClassifier:
    """MobileNet-V2 (torchvision's, CIFAR strides); ``width`` = stem channels (default 32, width_mult 1,
    ~2.2M params)."""
    return _wrap(MobileNetV2Backbone(in_channels, width), num_classes, in_channels, mean, std)
