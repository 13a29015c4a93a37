"""A Vision Transformer victim: torchvision's ``VisionTransformer``, a small form for small images.

Not in the three source texts; APBench's victims include a ViT. Two forms, like the other
architectures (:func:`~ue_lightning.models.registry.build_classifier`):

* below 128 px, a small ViT for 32 px images (ours, in the usual CIFAR shape): patches of 4 x 4
  pixels, 6 encoder layers, ``width`` channels (default 256), ``width // 32`` heads (at least one),
  an MLP of ``2 * width``; 3.2M parameters at the default width with 10 classes;
* at 128 px and above, torchvision's ViT-B/16 (patches of 16, 12 layers, 12 heads, 768 channels).

Unlike the convolutional victims a ViT takes one image size only, the ``image_size`` it was built
for (a multiple of the patch size), which is the size a victim trains and tests at.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torchvision.models.vision_transformer import VisionTransformer

from .normalize import ImageClassifier, Normalize

MeanStd = float | Sequence[float] | None

#: The small form's patch side (pixels), encoder layers and channels a head.
SMALL_PATCH, SMALL_LAYERS, CHANNELS_PER_HEAD = 4, 6, 32
#: ViT-B/16's (torchvision ``vit_b_16``) patch side, layers, heads, channels and MLP channels.
BASE = dict(patch_size=16, num_layers=12, num_heads=12, hidden_dim=768, mlp_dim=3072)


class ViTBackbone(nn.Module):
    """``(B, C, image_size, image_size)`` normalised -> the class token's features ``(B, out_features)``."""

    def __init__(self, in_channels: int, image_size: int, *, patch_size: int, num_layers: int, num_heads: int,
                 hidden_dim: int, mlp_dim: int) -> None:
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"arch vit: image_size {image_size} is not a multiple of its patch size {patch_size} "
                             f"(use a size such as {max(patch_size, image_size // patch_size * patch_size)})")
        self.vit = VisionTransformer(image_size=image_size, patch_size=patch_size, num_layers=num_layers,
                                     num_heads=num_heads, hidden_dim=hidden_dim, mlp_dim=mlp_dim)
        self.vit.heads = nn.Identity()
        if in_channels != 3:  # torchvision's patch embedding takes RGB; the same init for C channels
            proj = nn.Conv2d(in_channels, hidden_dim, kernel_size=patch_size, stride=patch_size)
            nn.init.trunc_normal_(proj.weight, std=math.sqrt(1 / (in_channels * patch_size ** 2)))
            nn.init.zeros_(proj.bias)
            self.vit.conv_proj = proj
        self.out_features = hidden_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.vit(x)


def vit_classifier(num_classes: int, in_channels: int = 3, image_size: int = 32, width: int | None = None,
                   mean: MeanStd = None, std: MeanStd = None, imagenet_form: bool = False) -> ImageClassifier:
    """A ViT :class:`ImageClassifier` for ``image_size`` px images: the small form, or ViT-B/16 if ``imagenet_form``
    (no ``width`` there). Pixels in [0, 1] in, logits ``(B, num_classes)`` out."""
    if imagenet_form:
        backbone = ViTBackbone(in_channels, image_size, **BASE)
    else:
        width = 256 if width is None else width
        heads = max(1, width // CHANNELS_PER_HEAD)
        if width % heads:
            raise ValueError(f"arch vit: width {width} must be a multiple of its {heads} heads (width // "
                             f"{CHANNELS_PER_HEAD}): e.g. {heads * CHANNELS_PER_HEAD}")
        backbone = ViTBackbone(in_channels, image_size, patch_size=SMALL_PATCH, num_layers=SMALL_LAYERS,
                               num_heads=heads, hidden_dim=width, mlp_dim=2 * width)
    return ImageClassifier(backbone, nn.Linear(backbone.out_features, num_classes), Normalize(mean, std, in_channels))
