"""Input normalisation and the common classifier wrapper.

Every classifier built by :mod:`ue_lightning.models` takes pixels in ``[0, 1]``
(float, shape ``(B, C, H, W)``) and normalises them itself, so that attacks and
perturbation budgets can be expressed in raw pixel units.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

CIFAR10_MEAN: tuple[float, float, float] = (0.4914, 0.4822, 0.4465)
CIFAR10_STD: tuple[float, float, float] = (0.2471, 0.2435, 0.2616)
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


def default_mean_std(in_channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Default per-channel statistics: CIFAR-10 for 3 channels, 0.5/0.5 otherwise."""
    if in_channels == 3:
        return CIFAR10_MEAN, CIFAR10_STD
    return (0.5,) * in_channels, (0.5,) * in_channels


def _as_channel_tuple(values: float | Sequence[float], in_channels: int, name: str) -> tuple[float, ...]:
    if isinstance(values, (int, float)):
        return (float(values),) * in_channels
    out = tuple(float(v) for v in values)
    if len(out) == 1:
        out = out * in_channels
    if len(out) != in_channels:
        raise ValueError(f"{name} has {len(out)} values but in_channels={in_channels}")
    return out


class Normalize(nn.Module):
    """Per-channel ``(x - mean) / std``.

    Args:
        mean: per-channel mean in pixel units ([0, 1] scale); a scalar or a
            length-1 sequence is broadcast to all channels. ``None`` picks
            :func:`default_mean_std`.
        std: per-channel standard deviation, same conventions (must be > 0).
        in_channels: number of channels C.

    Shapes: ``(B, C, H, W) -> (B, C, H, W)``. ``mean``/``std`` are persistent
    buffers of shape ``(1, C, 1, 1)`` (saved in the state dict, moved by ``.to``).
    """

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(
        self,
        mean: float | Sequence[float] | None = None,
        std: float | Sequence[float] | None = None,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        default_mean, default_std = default_mean_std(in_channels)
        mean_t = _as_channel_tuple(default_mean if mean is None else mean, in_channels, "mean")
        std_t = _as_channel_tuple(default_std if std is None else std, in_channels, "std")
        if min(std_t) <= 0:
            raise ValueError(f"std must be positive, got {std_t}")
        self.in_channels = in_channels
        self.register_buffer("mean", torch.tensor(mean_t, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std_t, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        mean = [round(v, 4) for v in self.mean.flatten().tolist()]
        std = [round(v, 4) for v in self.std.flatten().tolist()]
        return f"mean={mean}, std={std}"


class ImageClassifier(nn.Module):
    """``normalize -> backbone -> head``: logits for pixels in ``[0, 1]``.

    Attributes:
        normalize: :class:`Normalize` (first layer).
        backbone: maps a normalised ``(B, C, H, W)`` batch to pooled features
            ``(B, feature_dim)``.
        head: ``nn.Linear(feature_dim, num_classes)``.
        feature_dim, num_classes, in_channels: ints.
        channels_last: whether the batch is made channels-last before the backbone (as the weights are:
            :func:`~ue_lightning.models.registry.build_classifier` decides both) or NCHW.

    ``forward(x)``: ``(B, C, H, W)`` in [0, 1] -> logits ``(B, num_classes)``.
    The batch is put in the weights' layout first (channels-last: faster convolutions; same values up to
    float rounding).
    ``forward_features(x)``: same input -> penultimate features ``(B, feature_dim)``.
    """

    def __init__(self, backbone: nn.Module, head: nn.Linear, normalize: Normalize) -> None:
        super().__init__()
        self.normalize = normalize
        self.backbone = backbone
        self.head = head
        self.feature_dim = head.in_features
        self.num_classes = head.out_features
        self.in_channels = normalize.in_channels
        self.channels_last = True

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 4:
            # Channels-last, as the weights (build_classifier): 1.3-1.5x faster RGB training on CPU with oneDNN
            # (benchmarks/RESULTS.md), the layout tensor cores want on GPUs. Every later layer keeps it.
            # (A one-channel batch already is channels-last: no copy, and its NCHW weights decide the layout.)
            # A model kept NCHW gets an NCHW batch: a channels-last input alone would make every layer
            # channels-last again.
            x = x.contiguous(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)
        return self.backbone(self.normalize(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))


def conv_with_inputs(conv: nn.Conv2d, in_channels: int) -> nn.Conv2d:
    """Copy of ``conv``'s hyper-parameters with ``in_channels`` inputs, He-initialised."""
    new = nn.Conv2d(
        in_channels,
        conv.out_channels,
        kernel_size=conv.kernel_size,  # type: ignore[arg-type]
        stride=conv.stride,  # type: ignore[arg-type]
        padding=conv.padding,  # type: ignore[arg-type]
        bias=conv.bias is not None,
    )
    nn.init.kaiming_normal_(new.weight, mode="fan_out", nonlinearity="relu")
    if new.bias is not None:
        nn.init.zeros_(new.bias)
    return new
