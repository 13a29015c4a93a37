"""Clean image datasets as uint8 tensors, each sample addressed by its index in the split.

Every dataset here is a :class:`CleanImages`: ``dataset[i]`` returns ``(image, label)``
with ``image`` a uint8 tensor (C, H, W), 0-255, *before* any noise or augmentation.
:class:`~ue_lightning.data.datamodule.ProtectedImages` adds the noise and the
augmentation and yields ``(image, label, index)``.

Two storage forms cover every source:

* :class:`ImageArray`, in memory: CIFAR-10/100 (torchvision's files), ``.npz`` arrays,
  scikit-learn's digits (the embedded default, real data shipped inside a package);
* :class:`ImageFiles`, read lazily from disk and resized to a fixed square: the
  ImageNet subset (first ``num_classes`` sorted class folders) and any image folder.
"""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.transforms.v2 import functional as TF

from ue_lightning.data.cifar_batches import EXPORT_MARKER, is_export, load_export
from ue_lightning.data.noise_file import DataFingerprint


def _sha256(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


class CleanImages(Dataset):
    """Base class: a split of clean images with integer labels."""

    name: str
    split: str
    num_classes: int
    image_shape: tuple[int, int, int]  # (C, H, W) of the uint8 image noise is added to
    targets: Tensor  # int64 (N,)
    class_names: list[str]

    def image_batch(self, indices: Sequence[int]) -> Tensor:
        """uint8 images (B, C, H, W) of the given indices."""
        return torch.stack([self[int(i)][0] for i in indices])

    def __len__(self) -> int:
        return len(self.targets)

    def fingerprint(self) -> DataFingerprint:
        raise NotImplementedError


def _integer_labels(labels: Sequence[int] | np.ndarray | Tensor, where: str) -> Tensor:
    """Labels as int64, refusing what a cast would silently change: fractions, negatives."""
    array = np.asarray(labels)
    if array.dtype.kind == "f" and not np.array_equal(array, np.round(array)):
        raise ValueError(f"{where}: labels must be whole class numbers, got fractions such as "
                         f"{array[array != np.round(array)][0]}")
    if array.dtype.kind not in "iuf" and array.size:
        raise ValueError(f"{where}: labels must be integers, got {array.dtype}")
    targets = torch.as_tensor(array.astype(np.int64))
    if len(targets) and int(targets.min()) < 0:
        raise ValueError(f"{where}: label {int(targets.min())} is negative; classes are numbered 0, 1, ... "
                         "(relabel the data; -1 'unlabelled' samples must be removed)")
    return targets


class ImageArray(CleanImages):
    """Images held in memory as one uint8 tensor (N, C, H, W)."""

    def __init__(self, images: Tensor | np.ndarray, labels: Sequence[int] | np.ndarray | Tensor, *,
                 name: str, split: str, num_classes: int | None = None, channels_last: bool = False,
                 class_names: Sequence[str] | None = None):
        images = torch.as_tensor(np.asarray(images))
        if images.dtype != torch.uint8:
            raise TypeError(f"{name}/{split}: images must be uint8 0-255, got {images.dtype}")
        if images.ndim == 3:  # (N, H, W) greyscale
            images = images.unsqueeze(1)
        elif channels_last:
            if images.shape[1] in (1, 3, 4) and images.shape[3] not in (1, 3, 4):
                raise ValueError(f"{name}/{split}: images of shape {tuple(images.shape)} look NCHW; this layout "
                                 "is NHWC (N, H, W, C) as CIFAR's: store x.transpose(0, 2, 3, 1)")
            images = images.permute(0, 3, 1, 2)
        self.images = images.contiguous()
        self.targets = _integer_labels(labels, f"{name}/{split}")
        if len(self.images) != len(self.targets):
            raise ValueError(f"{name}/{split}: {len(self.images)} images but {len(self.targets)} labels")
        self.name, self.split = name, split
        self.num_classes = int(num_classes if num_classes is not None else int(self.targets.max()) + 1)
        if len(self.targets) and int(self.targets.max()) >= self.num_classes:
            raise ValueError(f"{name}/{split}: label {int(self.targets.max())} but only {self.num_classes} classes")
        self.image_shape = tuple(self.images.shape[1:])
        self.class_names = list(class_names) if class_names is not None else [str(c) for c in range(self.num_classes)]

    def image_batch(self, indices: Sequence[int]) -> Tensor:
        return self.images[torch.as_tensor(indices, dtype=torch.int64)]

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        return self.images[i], int(self.targets[i])

    def fingerprint(self) -> DataFingerprint:
        return DataFingerprint(self.name, self.split, len(self), self.image_shape, self.num_classes,
                               _sha256(self.targets.numpy()), _sha256(self.images.numpy()))


def grey8(img: Image.Image) -> Image.Image:
    """16-bit greyscale (PNG ``I;16``, or ``I``) scaled to 8-bit ``L`` (0-255); other images unchanged.
    PIL's own ``convert`` clips such images, turning almost every pixel white."""
    if img.mode.startswith("I;16") or img.mode == "I":
        wide = np.asarray(img, dtype=np.float64)
        full = 65535.0 if img.mode.startswith("I;16") or wide.max() > 255 else 255.0
        img = Image.fromarray(np.rint(wide * (255.0 / full)).clip(0, 255).astype(np.uint8))  # mode L
    return img


def rgb8(img: Image.Image) -> Image.Image:
    """An 8-bit RGB copy of ``img`` (16-bit greyscale scaled, see :func:`grey8`)."""
    return grey8(img).convert("RGB")


class ImageFiles(CleanImages):
    """Images read from files, resized (shorter side) and centre-cropped to ``size`` x ``size``.

    This fixed-size uint8 image is what noise is added to; the training crop (e.g. 224
    of 256, REM's order) comes afterwards, in the augmentation.
    """

    def __init__(self, samples: list[tuple[str, int]], *, root: Path, name: str, split: str,
                 class_names: Sequence[str], size: int):
        self.samples = samples
        self.root = Path(root)
        self.targets = torch.tensor([label for _, label in samples], dtype=torch.int64)
        self.name, self.split, self.size = name, split, size
        self.class_names, self.num_classes = list(class_names), len(class_names)
        self.image_shape = (3, size, size)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        path, label = self.samples[i]
        try:
            with Image.open(path) as img:
                image = TF.pil_to_tensor(rgb8(img))
        except (OSError, SyntaxError, ValueError) as err:  # PIL's errors for damaged image data
            raise CorruptImageError(f"{path} cannot be decoded ({err}): its header is intact but its data is "
                                    "damaged; replace or delete the file (a dataset with it removed is a "
                                    "different dataset: regenerate its noise)") from err
        image = TF.resize(image, [self.size], antialias=True)
        return TF.center_crop(image, [self.size, self.size]), label

    def fingerprint(self) -> DataFingerprint:
        h = hashlib.sha256()
        for path, _ in self.samples:
            h.update(f"{Path(path).relative_to(self.root)}:{Path(path).stat().st_size}\n".encode())
        return DataFingerprint(self.name, self.split, len(self), self.image_shape, self.num_classes,
                               _sha256(self.targets.numpy()), h.hexdigest())


class CorruptImageError(ValueError):
    """An image file whose data cannot be decoded."""


def readable_images(files: Sequence[Path], what: str) -> list[Path]:
    """``files`` without those PIL cannot identify (damaged headers, non-images), named in one warning.

    Only the header is read (no decoding), so checking a folder costs little; a file whose
    header is intact but whose data is damaged fails later, naming itself (:class:`ImageFiles`).
    """
    good, bad = [], []
    for path in files:
        try:
            with Image.open(path) as img:
                img.size  # noqa: B018 - parsing the header is the check
            good.append(path)
        except (OSError, SyntaxError, ValueError):
            bad.append(path)
    if bad:
        shown = ", ".join(str(p) for p in bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        warnings.warn(f"{what}: skipped {len(bad)} file(s) that are not readable images: {shown}", stacklevel=3)
    return good


# --------------------------------------------------------------------------- sources
def _missing(path: Path, what: str, fix: str) -> FileNotFoundError:
    return FileNotFoundError(f"{what} not found at {path.resolve()}: {fix}")


def load_cifar(name: str, root: str | Path, train: bool, download: bool) -> ImageArray:
    """CIFAR-10 or CIFAR-100 from torchvision's python-batch files under ``root``."""
    from torchvision.datasets import CIFAR10, CIFAR100

    cls = {"cifar10": CIFAR10, "cifar100": CIFAR100}[name]
    folder = Path(root) / cls.base_folder
    split = "train" if train else "test"
    if is_export(folder):  # a protected set written by `ue export --format cifar` (see cifar_batches)
        data, labels, classes = load_export(folder, train, cifar100=name == "cifar100")
        return ImageArray(data, labels, name=name, split=split, num_classes=len(classes), channels_last=True,
                          class_names=classes)
    holds_files = folder.is_dir() and any(folder.iterdir())
    try:  # first without downloading: a download would overwrite whatever the folder holds
        ds = cls(str(root), train=train, download=download and not holds_files)
    except RuntimeError as e:
        if holds_files:
            raise ValueError(f"{folder} holds files that are not the original {name} batches ({e}): if they are "
                             "a protected export, export it again with `ue export --format cifar` (its marker "
                             f"file {EXPORT_MARKER} is missing); nothing is downloaded over them") from None
        raise _missing(folder, f"{name} ({e})",
                       "set `data.download: true` (or --data.download true) to fetch it, or point "
                       f"`data.root` at the folder that contains {cls.base_folder}/") from None
    return ImageArray(ds.data, ds.targets, name=name, split="train" if train else "test",
                      num_classes=len(ds.classes), channels_last=True, class_names=ds.classes)


def load_svhn(root: str | Path, train: bool, download: bool) -> ImageArray:
    """SVHN's cropped digits (32x32 RGB; train 73257, test 26032; label 10 read as 0, as torchvision does) from
    torchvision's files ``root/train_32x32.mat`` and ``root/test_32x32.mat``. The ``extra`` split is not used."""
    from torchvision.datasets import SVHN

    split = "train" if train else "test"
    filename = SVHN.split_list[split][1]
    path = Path(root) / filename
    try:  # torchvision checks the file's md5 and never downloads over a file that is there
        ds = SVHN(str(root), split=split, download=download and not path.exists())
    except RuntimeError as e:
        if path.exists():
            raise ValueError(f"{path} is not the original SVHN {split} file ({e}): delete it and set "
                             "`data.download: true`, or put torchvision's file there") from None
        raise _missing(path, f"svhn {split} file ({e})", "set `data.download: true` (or --data.download true) to "
                       f"fetch it, or point `data.root` at the folder that holds {filename}") from None
    return ImageArray(ds.data, ds.labels, name="svhn", split=split, num_classes=10,
                      class_names=[str(c) for c in range(10)])


def load_npz(path: str | Path, train: bool) -> ImageArray:
    """uint8 arrays ``x_train``/``y_train``/``x_test``/``y_test`` in an ``.npz`` (NHWC or NHW)."""
    path = Path(path)
    if not path.is_file():
        raise _missing(path, "npz dataset", "point `data.root` at an .npz file with x_train, y_train, "
                       "x_test, y_test (uint8 images, int labels)")
    split = "train" if train else "test"
    with np.load(path) as f:
        missing = {f"x_{split}", f"y_{split}"} - set(f.files)
        if missing:
            raise KeyError(f"{path} lacks arrays {sorted(missing)}; it has {sorted(f.files)}")
        x, y = f[f"x_{split}"], f[f"y_{split}"]
        num_classes = int(max(f["y_train"].max(), f["y_test"].max()) + 1) if "y_test" in f.files else None
        names = [str(c) for c in f["class_names"]] if "class_names" in f.files else None
    return ImageArray(x, y, name=f"npz:{path.name}", split=split, num_classes=num_classes,
                      channels_last=x.ndim == 4, class_names=names)


def load_digits(train: bool, size: int = 8) -> ImageArray:
    """scikit-learn's digits (1797 real 8x8 greyscale images, 10 classes), shipped in the package.

    Pixels 0-16 are scaled to 0-255 (17 grey levels, 16/255 apart). The split is fixed: every
    fourth image (index % 4 == 0) is the test set (450 images), the rest the train set (1347).
    ``size`` (a multiple of 8) enlarges each image by pixel repetition (nearest neighbour):
    no new grey levels, no new detail, only room for a perturbation finer than a digit pixel.
    """
    if size < 8 or size % 8:
        raise ValueError(f"digits size={size}: the 8x8 digits are enlarged by a whole factor; use 8, 16, 24 or 32")
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    images = np.rint(d.images * (255.0 / 16.0)).astype(np.uint8)
    images = images.repeat(size // 8, axis=1).repeat(size // 8, axis=2)
    keep = (np.arange(len(images)) % 4 != 0) if train else (np.arange(len(images)) % 4 == 0)
    return ImageArray(images[keep], d.target[keep], name="digits", split="train" if train else "test",
                      num_classes=10)


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def load_image_folder(root: str | Path, train: bool, *, size: int, num_classes: int | None,
                      name: str = "folder", val_dirs: Sequence[str] = ("val", "test")) -> ImageFiles:
    """An ImageFolder tree ``root/train/<class>/*`` and ``root/val/<class>/*`` (or ``test/``).

    Classes are the sorted folder names of ``train/``; ``num_classes`` keeps the first ones
    (the ImageNet subset: the first 100 sorted wnids). The evaluation split uses the same
    classes, by name.
    """
    root = Path(root)
    train_dir = root / "train"
    if not train_dir.is_dir():
        raise _missing(train_dir, f"{name} train folder",
                       "lay the images out as <root>/train/<class>/*.JPEG and <root>/val/<class>/*.JPEG "
                       "and set `data.root` to <root>")
    classes = sorted(p.name for p in train_dir.iterdir() if p.is_dir())
    if num_classes is not None:
        if num_classes > len(classes):
            raise ValueError(f"{name}: num_classes={num_classes} but {train_dir} has only {len(classes)} classes")
        classes = classes[:num_classes]
    if train:
        split_dir = train_dir
    else:
        found = [root / d for d in val_dirs if (root / d).is_dir()]
        if not found:
            raise _missing(root / val_dirs[0], f"{name} evaluation folder",
                           f"add {root}/val/<class>/* with the same class folder names as train/")
        split_dir = found[0]
    samples: list[tuple[str, int]] = []
    for label, cls in enumerate(classes):
        folder = split_dir / cls
        files = sorted(p for p in folder.glob("*") if p.suffix.lower() in IMAGE_EXTENSIONS) if folder.is_dir() else []
        files = readable_images(files, f"{name} {split_dir.name}/{cls}")
        if train and not files:  # a class without a single training image: the model would get a dead logit
            raise ValueError(f"{name}: the class folder {folder} holds no images ({', '.join(IMAGE_EXTENSIONS)}): "
                             "remove it or add its images")
        samples.extend((str(p), label) for p in files)
    if not samples:
        raise _missing(split_dir, f"{name} images", "no image files found for the selected classes")
    return ImageFiles(samples, root=root, name=name, split="train" if train else "test",
                      class_names=classes, size=size)


DATASETS = ("digits", "cifar10", "cifar100", "svhn", "imagenet_subset", "folder", "npz")


def load_dataset(name: str, root: str | Path, train: bool, *, download: bool = False,
                 num_classes: int | None = None, resize: int | None = None) -> CleanImages:
    """Load one split of a dataset by name (see :data:`DATASETS`).

    ``resize``: the stored square size of folder datasets (None: 256) or of the digits
    (None: 8; a multiple of 8). CIFAR, SVHN and npz images are used as stored.
    """
    if name == "digits":
        return load_digits(train, size=resize or 8)
    if resize is not None and name not in ("imagenet_subset", "folder"):
        raise ValueError(f"resize={resize} is for folder datasets and the digits; {name} images are used as stored "
                         "(remove data.resize)")
    resize = resize or 256
    if name in ("cifar10", "cifar100"):
        return load_cifar(name, root, train, download)
    if name == "svhn":
        return load_svhn(root, train, download)
    if name == "npz":
        return load_npz(root, train)
    if name == "imagenet_subset":
        return load_image_folder(root, train, size=resize, num_classes=num_classes or 100, name=name)
    if name == "folder":
        return load_image_folder(root, train, size=resize, num_classes=num_classes, name=name)
    raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
