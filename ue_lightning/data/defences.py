"""Defences a data thief would try: preprocessing and augmentation of the victim's training images.

A defence touches only the victim's *train* split, after the protection noise has been added
(as the thief reads the published data), never the clean test split. It acts at up to three
places of the train pipeline, each named by a field of :class:`Defence`:

* ``squeeze``: on the stored uint8 image (C, H, W), 0-255, before the crop/flip augmentation
  (JPEG, greyscale, bit-depth reduction, ISS, Gaussian smoothing: the data is filtered once, as ISS does);
* ``augment``: on the float image (C, H, W) in [0, 1] after crop/flip (cutout); with ``views`` > 1
  it is drawn that many times and the views stacked (V, C, H, W);
* ``batch``: on the collated batch: labels become soft targets (mixup, cutmix), or every image (every
  view) is augmented on its own by kornia's batch operators (UEraser; UEraser-Max on 5 views of each image).

Each name is a preset with its paper's parameters (:data:`DEFENCES`); the classes below take
other values from Python.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Callable, Literal, get_args

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import default_collate
from PIL import Image
from torchvision.transforms import v2

DefenceName = Literal["none", "jpeg10", "jpeg50", "grayscale", "bitdepth", "gaussian", "cutout", "mixup", "cutmix",
                      "iss", "ueraser", "ueraser-max"]
#: Every ``data.defence`` value, in the order of the table in docs/defences.md.
DEFENCES: tuple[str, ...] = get_args(DefenceName)
#: Bit depth of ``bitdepth``, ours: Xu et al. 2018 test 1-8 bits on CIFAR-10 and detect with 5; 4 squeezes harder.
BIT_DEPTH = 4
#: Gaussian smoothing's kernel side and standard deviation, pixels: ours (3x3, with the sigma OpenCV gives a 3x3
#: kernel, 0.3 ((3 - 1) / 2 - 1) + 0.8; APBench lists Gaussian smoothing among its defences).
GAUSSIAN_KERNEL, GAUSSIAN_SIGMA = 3, 0.8
#: Augmented views of each image under ``ueraser-max`` (UEraser's ``repeat``/``--repeats``: 5).
UERASER_MAX_VIEWS = 5


class Jpeg(torch.nn.Module):
    """JPEG recompression at ``quality`` (1-95) through PIL, as ISS's and UEraser's code do it.

    Takes and returns uint8 images (C, H, W), 0-255, with C = 1 or 3 (PIL's defaults: 4:2:0
    chroma subsampling for colour images). Deterministic: the same image gives the same output.
    """

    def __init__(self, quality: int):
        super().__init__()
        if not 1 <= quality <= 95:
            raise ValueError(f"JPEG quality={quality} must be in 1..95")
        self.quality = quality

    def forward(self, image: Tensor) -> Tensor:
        array = image.permute(1, 2, 0).numpy()
        stream = io.BytesIO()
        Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).save(stream, "JPEG", quality=self.quality)
        decoded = np.array(Image.open(stream))
        return torch.from_numpy(decoded).reshape(array.shape).permute(2, 0, 1).contiguous()


def grayscale(image: Tensor) -> Tensor:
    """Luma (ITU-R 601-2) of an RGB image (3, H, W) repeated on the 3 channels; 1-channel images unchanged."""
    if image.shape[-3] == 1:
        return image
    return v2.functional.rgb_to_grayscale(image, num_output_channels=3)


def gaussian_smoothing(image: Tensor) -> Tensor:
    """A :data:`GAUSSIAN_KERNEL`-wide Gaussian blur of standard deviation :data:`GAUSSIAN_SIGMA` pixels, each channel
    alone, borders reflected (torchvision's ``gaussian_blur``): uint8 (C, H, W), 0-255, in and out (rounded)."""
    return v2.functional.gaussian_blur(image, [GAUSSIAN_KERNEL, GAUSSIAN_KERNEL], [GAUSSIAN_SIGMA, GAUSSIAN_SIGMA])


class BitDepth(torch.nn.Module):
    """Feature squeezing's bit-depth reduction (Xu et al., NDSS 2018): ``round(x * (2^b - 1)) / (2^b - 1)``.

    Takes and returns uint8 images (0-255); the output holds at most ``2**bits`` grey levels
    per channel, evenly spaced from 0 to 255 (unlike ``v2.RandomPosterize``, which masks the
    low bits and so never reaches 255).
    """

    def __init__(self, bits: int = BIT_DEPTH):
        super().__init__()
        if not 1 <= bits <= 8:
            raise ValueError(f"bits={bits} must be in 1..8")
        self.bits = bits

    def forward(self, image: Tensor) -> Tensor:
        levels = 2 ** self.bits - 1
        return (image.float() * (levels / 255)).round().mul(255 / levels).round().to(torch.uint8)


class Cutout(torch.nn.Module):
    """Cutout (DeVries & Taylor 2017): zero a ``size`` x ``size`` square at a uniform random centre.

    Images (C, H, W) float in [0, 1]; the centre may lie anywhere in the image and the square
    is clipped at the border (as the paper's code), so up to ``size**2`` pixels a channel become 0.
    """

    def __init__(self, size: int):
        super().__init__()
        if size < 1:
            raise ValueError(f"cutout size={size} must be positive")
        self.size = size

    def forward(self, image: Tensor) -> Tensor:
        h, w = image.shape[-2:]
        cy, cx = int(torch.randint(h, ())), int(torch.randint(w, ()))
        half = self.size // 2
        out = image.clone()
        out[..., max(cy - half, 0):cy - half + self.size, max(cx - half, 0):cx - half + self.size] = 0
        return out


def ueraser() -> torch.nn.Module:
    """UEraser-Lite's augmentations (Qin et al. 2023, code ``lafeat/ueraser``) on a float batch (N, C, H, W) in [0, 1].

    Kornia's operators with the reference's parameters: plasma brightness (roughness 0.3-0.7,
    intensity 0.5-1, p 0.5), plasma contrast (roughness 0.3-0.7, p 0.5), channel shuffle (p 0.5)
    and kornia's TrivialAugment, each drawn for every image of the batch on its own. Kornia draws
    from torch's global generator, so a seeded run (a DataLoader worker's seed) repeats its draws.
    """
    import kornia.augmentation as K  # only here: importing kornia takes about 2 s

    return K.AugmentationSequential(
        K.RandomPlasmaBrightness(roughness=(0.3, 0.7), intensity=(0.5, 1.0), p=0.5, keepdim=True),
        K.RandomPlasmaContrast(roughness=(0.3, 0.7), p=0.5, keepdim=True),
        K.RandomChannelShuffle(p=0.5, keepdim=True),
        K.auto.TrivialAugment())


class BatchAugment:
    """A train DataLoader's ``collate_fn``: collate ``(image, label, index)`` samples, then augment every image.

    Images (B, C, H, W), or views (B, V, C, H, W), float in [0, 1]; ``augment`` takes a batch
    (N, C, H, W) and draws for each image (each view) on its own. Labels and indices pass as they are.
    """

    def __init__(self, augment: Callable[[Tensor], Tensor]):
        self.augment = augment

    def __call__(self, samples: list[tuple[Tensor, int, int]]) -> tuple[Tensor, Tensor, Tensor]:
        x, y, index = default_collate(samples)
        with torch.no_grad():
            out = self.augment(x.flatten(0, x.dim() - 4))
        return out.reshape(x.shape), y, index


class Views(torch.nn.Module):
    """``count`` independent draws of a random ``transform`` of one float image (C, H, W), stacked: (count, C, H, W)."""

    def __init__(self, transform: Callable[[Tensor], Tensor], count: int):
        super().__init__()
        self.transform, self.count = transform, count

    def forward(self, image: Tensor) -> Tensor:
        return torch.stack([self.transform(image) for _ in range(self.count)])


class BatchMix:
    """A train DataLoader's ``collate_fn``: collate ``(image, label, index)`` samples, then mix with probability ``p``.

    Images (B, C, H, W) float in [0, 1]; labels leave as soft targets (B, num_classes),
    float, each row summing to 1 (one-hot when the batch is not mixed); ``index`` is kept.
    ``mix`` is torchvision's ``v2.MixUp`` or ``v2.CutMix``: each image is mixed with the
    previous one of the batch, with lambda ~ Beta(alpha, alpha); CutMix then sets the label
    weights to the pasted box's share of the pixels.
    """

    def __init__(self, mix: v2.Transform, num_classes: int, p: float = 1.0):
        self.mix, self.num_classes, self.p = mix, num_classes, p

    def __call__(self, samples: list[tuple[Tensor, int, int]]) -> tuple[Tensor, Tensor, Tensor]:
        x, y, index = default_collate(samples)
        if torch.rand(()) < self.p:
            x, soft = self.mix(x, y)
        else:
            soft = F.one_hot(y, self.num_classes).float()
        return x, soft, index


@dataclass
class Defence:
    """A defence as the three places of the train pipeline it acts at (see the module's docstring)."""

    name: str
    squeeze: list[Callable[[Tensor], Tensor]] = field(default_factory=list)
    augment: list[Callable[[Tensor], Tensor]] = field(default_factory=list)
    batch: BatchMix | BatchAugment | None = None  # the train DataLoader's collate_fn
    views: int = 1  # > 1: ``augment`` is drawn this many times per image, and the train batch is (B, V, C, H, W)

    @property
    def mixes_labels(self) -> bool:
        """True when train labels arrive as soft targets (B, num_classes) instead of class indices (B,)."""
        return isinstance(self.batch, BatchMix)


def build_defence(name: str, *, dataset: str, image_size: int, num_classes: int) -> Defence:
    """The preset ``name`` with its paper's parameters.

    Args:
        name: one of :data:`DEFENCES`.
        dataset: the DataModule's dataset (cutout's size depends on it).
        image_size: side of the model's input in pixels (cutout acts after the crop).
        num_classes: classes of the soft targets of mixup and cutmix.
    """
    if name not in DEFENCES:
        raise ValueError(f"unknown defence {name!r}; choose one of {', '.join(DEFENCES)}")
    if name in ("jpeg10", "jpeg50"):  # ISS (Liu et al. 2023) uses quality 10; 50 is a milder recompression
        return Defence(name, squeeze=[Jpeg(int(name[4:]))])
    if name == "grayscale":  # ISS's answer to low-frequency noise (made on slightly trained surrogates)
        return Defence(name, squeeze=[grayscale])
    if name == "bitdepth":
        return Defence(name, squeeze=[BitDepth(BIT_DEPTH)])
    if name == "gaussian":  # a low-pass filter: the noise's high frequencies go, the image's edges soften
        return Defence(name, squeeze=[gaussian_smoothing])
    if name == "iss":  # ISS's two compressions in its code's order: greyscale, then JPEG quality 10
        return Defence(name, squeeze=[grayscale, Jpeg(10)])
    if name == "cutout":  # DeVries & Taylor: 16x16 on CIFAR-10 (half the side), 8x8 on CIFAR-100
        return Defence(name, augment=[Cutout(8 if dataset == "cifar100" else max(1, image_size // 2))])
    if name == "ueraser":
        return Defence(name, batch=BatchAugment(ueraser()))
    if name == "ueraser-max":  # 5 views (its README and code); the victim trains on each image's worst view
        return Defence(name, batch=BatchAugment(ueraser()), views=UERASER_MAX_VIEWS)
    if name == "mixup":  # Zhang et al. 2018: alpha 1 on CIFAR, every batch
        return Defence(name, batch=BatchMix(v2.MixUp(alpha=1.0, num_classes=num_classes), num_classes))
    if name == "cutmix":  # Yun et al. 2019: alpha (beta) 1, cutmix_prob 0.5 in the authors' CIFAR command
        return Defence(name, batch=BatchMix(v2.CutMix(alpha=1.0, num_classes=num_classes), num_classes, p=0.5))
    return Defence(name)
