"""ImageNet-resolution (224 px) classifiers: the stock torchvision architectures.

Always built with ``weights=None`` (random init, nothing is downloaded). The
first convolution is replaced when ``in_channels != 3`` and the final linear
layer is split off as the head of an :class:`ImageClassifier`, whose first layer
normalises pixels in ``[0, 1]``.

Mapping of architecture names:

* ``vgg16`` -> ``torchvision.models.vgg16_bn`` (features are the 4096-d output
  of the second fully-connected layer).
* ``resnet18`` / ``resnet50`` -> ``resnet18`` / ``resnet50``.
* ``densenet121`` -> ``densenet121``.
* ``mobilenet_v2`` -> ``mobilenet_v2`` (its dropout kept before the head).
* ``wrn34_10`` -> ``wide_resnet50_2`` (the torchvision wide ResNet; a 7x7-stem
  WRN-34-10 would cost ~2x its FLOPs at 224 px and has no reference results).

These forms have no ``width`` knob (torchvision hard-codes most widths); use
the CIFAR forms (``image_size < 128``) for tiny models. They accept any input
of roughly 64 px or more (tested at 128 and 224).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import nn
from torchvision import models as tvm

from .normalize import ImageClassifier, Normalize, conv_with_inputs

MeanStd = float | Sequence[float] | None


def _split_resnet(model: nn.Module, in_channels: int) -> tuple[nn.Module, nn.Linear]:
    if in_channels != 3:
        model.conv1 = conv_with_inputs(model.conv1, in_channels)  # type: ignore[arg-type]
    head = model.fc
    model.fc = nn.Identity()
    return model, head  # type: ignore[return-value]


def _split_densenet(model: nn.Module, in_channels: int) -> tuple[nn.Module, nn.Linear]:
    if in_channels != 3:
        model.features.conv0 = conv_with_inputs(model.features.conv0, in_channels)  # type: ignore[union-attr,arg-type]
    head = model.classifier
    model.classifier = nn.Identity()
    return model, head  # type: ignore[return-value]


def _split_vgg(model: nn.Module, in_channels: int) -> tuple[nn.Module, nn.Linear]:
    if in_channels != 3:
        model.features[0] = conv_with_inputs(model.features[0], in_channels)  # type: ignore[index,arg-type]
    head = model.classifier[-1]  # type: ignore[index]
    model.classifier[-1] = nn.Identity()  # type: ignore[index]
    return model, head  # type: ignore[return-value]


def _split_mobilenet(model: nn.Module, in_channels: int) -> tuple[nn.Module, nn.Linear]:
    if in_channels != 3:
        model.features[0][0] = conv_with_inputs(model.features[0][0], in_channels)  # type: ignore[index,arg-type]
    dropout, head = model.classifier  # type: ignore[misc]
    model.classifier = dropout  # type: ignore[assignment]
    return model, head  # type: ignore[return-value]


_TORCHVISION: dict[str, tuple[Callable[..., nn.Module], Callable[[nn.Module, int], tuple[nn.Module, nn.Linear]]]] = {
    "vgg16": (tvm.vgg16_bn, _split_vgg),
    "resnet18": (tvm.resnet18, _split_resnet),
    "resnet50": (tvm.resnet50, _split_resnet),
    "densenet121": (tvm.densenet121, _split_densenet),
    "wrn34_10": (tvm.wide_resnet50_2, _split_resnet),
    "mobilenet_v2": (tvm.mobilenet_v2, _split_mobilenet),
}


def imagenet_classifier(
    arch: str, num_classes: int, in_channels: int = 3, mean: MeanStd = None, std: MeanStd = None
) -> ImageClassifier:
    """Randomly initialised torchvision classifier wrapped with input normalisation.

    Args:
        arch: one of ``vgg16, resnet18, resnet50, densenet121, wrn34_10, mobilenet_v2``.
        num_classes: number of logits.
        in_channels: input channels (the stem conv is rebuilt if not 3).
        mean, std: per-channel normalisation statistics in [0, 1] pixel units;
            ``None`` -> CIFAR-10 statistics (3 channels) or 0.5/0.5. Pass
            ``IMAGENET_MEAN``/``IMAGENET_STD`` for ImageNet data.

    Returns: module mapping ``(B, in_channels, H, W)`` in [0, 1] to ``(B, num_classes)``.
    """
    if arch not in _TORCHVISION:
        raise ValueError(f"unknown ImageNet arch {arch!r}; valid: {', '.join(_TORCHVISION)}")
    ctor, split = _TORCHVISION[arch]
    backbone, head = split(ctor(weights=None, num_classes=num_classes), in_channels)
    return ImageClassifier(backbone, head, Normalize(mean, std, in_channels))
