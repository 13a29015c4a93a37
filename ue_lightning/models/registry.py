"""Name -> classifier factory (CIFAR form below 128 px, torchvision form at/above; airbench: one form)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from .airbench import airbench_classifier
from .checkpoint import build_checked
from .cifar import (cifar_densenet121, cifar_mobilenet_v2, cifar_resnet18, cifar_resnet50, cifar_vgg16,
                    cifar_wrn34_10)
from .imagenet import imagenet_classifier
from .normalize import ImageClassifier
from .vit import vit_classifier

ARCHITECTURES: tuple[str, ...] = ("vgg16", "resnet18", "resnet50", "densenet121", "wrn34_10", "mobilenet_v2",
                                  "vit", "airbench")

#: Smallest ``image_size`` for which the ImageNet (torchvision) form is used.
IMAGENET_MIN_SIZE = 128

_CIFAR: dict[str, Callable[..., ImageClassifier]] = {
    "vgg16": cifar_vgg16,
    "resnet18": cifar_resnet18,
    "resnet50": cifar_resnet50,
    "densenet121": cifar_densenet121,
    "wrn34_10": cifar_wrn34_10,
    "mobilenet_v2": cifar_mobilenet_v2,
}


def build_classifier(
    arch: str,
    num_classes: int,
    in_channels: int = 3,
    image_size: int = 32,
    width: int | None = None,
    mean: float | Sequence[float] | None = None,
    std: float | Sequence[float] | None = None,
) -> ImageClassifier:
    """Build a randomly initialised classifier taking pixels in ``[0, 1]``.

    Args:
        arch: one of :data:`ARCHITECTURES` (case-insensitive). ``airbench`` (the fast victim,
            :mod:`ue_lightning.models.airbench`) has one form at every ``image_size``; ``vit``
            (:mod:`ue_lightning.models.vit`) takes images of ``image_size`` only.
        num_classes: number of output logits.
        in_channels: image channels C (1 for greyscale).
        image_size: side length in pixels; ``>= 128`` selects the torchvision
            (ImageNet, 7x7-stem) form, otherwise the CIFAR (3x3-stem) form.
        width: channels of the first stage of the CIFAR form (see
            :mod:`ue_lightning.models.cifar`; ``None`` = the standard width:
            64; 160 for ``wrn34_10``; 32 for ``mobilenet_v2``) or of airbench's first group (64).
            Not supported by the ImageNet form.
        mean, std: per-channel normalisation in pixel units; ``None`` gives
            CIFAR-10 statistics for 3 channels, 0.5/0.5 otherwise.

    Returns: :class:`ImageClassifier`, ``(B, C, H, W)`` in [0, 1] -> logits ``(B, num_classes)``; for
        ``in_channels > 1`` its convolution weights are channels-last (so is the batch inside ``forward``), unless
        :func:`channels_last_is_safe` says oneDNN would corrupt the heap in that layout.

    Raises: ValueError for an unknown ``arch`` (message lists the valid names)
    or a ``width`` given with the ImageNet form.
    """
    name = arch.lower()
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown arch {arch!r}; valid choices: {', '.join(ARCHITECTURES)}")
    if num_classes < 1 or in_channels < 1:
        raise ValueError(f"num_classes and in_channels must be positive, got {num_classes}, {in_channels}")
    if width is not None and width < 1:
        raise ValueError(f"width must be positive, got {width}")
    kwargs = {} if width is None else {"width": width}
    if name == "airbench":
        model = airbench_classifier(num_classes, in_channels, mean=mean, std=std, **kwargs)
    elif image_size >= IMAGENET_MIN_SIZE and width is not None:
        raise ValueError(
            f"width is only supported by the CIFAR forms (image_size < {IMAGENET_MIN_SIZE}); "
            f"got width={width} with image_size={image_size}"
        )
    elif name == "vit":
        model = vit_classifier(num_classes, in_channels, image_size, width, mean, std,
                               imagenet_form=image_size >= IMAGENET_MIN_SIZE)
    elif image_size >= IMAGENET_MIN_SIZE:
        model = imagenet_classifier(name, num_classes, in_channels, mean, std)
    else:
        model = _CIFAR[name](num_classes, in_channels, mean=mean, std=std, **kwargs)
    # Weights channels-last, as ImageClassifier makes its input: weight gradients then have the weights'
    # strides (DDP's gradient buckets expect them), and convolutions run in the faster layout. Not where
    # oneDNN's weight gradient corrupts the heap in that layout (channels_last_is_safe): those models keep
    # NCHW weights and get NCHW batches.
    model.channels_last = channels_last_is_safe(model)
    return model.to(memory_format=torch.channels_last) if model.channels_last else model


# oneDNN 3.12 (torch 2.14) writes past its scratchpad in the weight gradient of a strided 1x1 convolution
# over a channels-last input with fewer input channels than its channel block (8 on AVX2, 16 on AVX-512):
# the heap is corrupted, then the process aborts, or hangs with 2 threads (uxlfoundation/oneDNN issue 6035;
# here: a width-4 ResNet-18's first shortcut, 4 -> 8 channels, stride 2). 16 covers both blocks.
POINTWISE_STRIDED_MIN_CHANNELS = 16


def channels_last_is_safe(model: nn.Module) -> bool:
    """Whether ``model`` may train channels-last on oneDNN: False for one input channel (a channels-last
    ``(w, 1, k, k)`` first-layer weight corrupted the heap at 2 threads: EM class-wise on the digits,
    torch 2.14.1) and for any strided 1x1 convolution with fewer than
    :data:`POINTWISE_STRIDED_MIN_CHANNELS` input channels (the narrow CPU-scale models' shortcuts)."""
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    if any(conv.in_channels == 1 for conv in convs):
        return False
    return not any(conv.kernel_size == (1, 1) and conv.stride != (1, 1)
                   and conv.in_channels < POINTWISE_STRIDED_MIN_CHANNELS for conv in convs)


def classifier_from_weights(hp: dict[str, Any], weights: dict[str, torch.Tensor], *, name: str) -> ImageClassifier:
    """The classifier that ``hp`` (arch, width, num_classes, in_channels, image_size) describes, with ``weights``."""
    return build_checked(lambda: build_classifier(hp["arch"], hp["num_classes"], in_channels=hp["in_channels"],
                                                  image_size=hp["image_size"], width=hp.get("width")),
                         weights, name=name, what=f"{hp['arch']} (width={hp.get('width')})")
