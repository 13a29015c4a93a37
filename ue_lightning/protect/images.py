"""A data owner's image files: finding them, reading each at its own size and mode, writing lossless PNGs.

A :class:`Photo` splits an image into the channels noise goes to (``colour``: grey or RGB)
and the ones it must not touch (``alpha``). Modes L, LA, RGB and RGBA are written back as
they were read; others are converted once, and the conversion is named in ``note``
(palette -> RGB or RGBA, bilevel -> L, 16-bit grey -> 8-bit L, CMYK and other colour
spaces -> RGB). Pixels are taken as displayed: an EXIF orientation is applied first.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor

from ue_lightning.data.datasets import IMAGE_EXTENSIONS, grey8
from ue_lightning.scratch import atomic_write_bytes

#: What PIL raises for files it cannot identify or decode.
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


EXIF_ORIENTATION = 0x0112


class UnreadableImage(ValueError):
    """A file with an image suffix that cannot be decoded (the message says why)."""


@dataclass
class Photo:
    """One image as noise sees it.

    Attributes:
        colour: uint8 (C, H, W), 0-255; C = 1 (grey) or 3 (RGB): the channels that get noise.
        alpha: uint8 (1, H, W) or None: transparency, written back unchanged.
        note: the conversion made while reading (None: the file's own mode is kept).
        icc_profile: the file's colour profile, written into the PNG (None: none).
    """

    colour: Tensor
    alpha: Tensor | None = None
    note: str | None = None
    icc_profile: bytes | None = None

    @property
    def mode(self) -> str:
        """The PNG mode it is written in: L, LA, RGB or RGBA."""
        return ("L" if self.colour.shape[0] == 1 else "RGB") + ("A" if self.alpha is not None else "")

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) in pixels."""
        return int(self.colour.shape[1]), int(self.colour.shape[2])


_KEPT = {"L": "L", "LA": "LA", "RGB": "RGB", "RGBA": "RGBA"}
_CONVERTED = {"1": "L", "La": "LA", "PA": "RGBA", "RGBa": "RGBA", "RGBX": "RGB", "I": "L", "I;16": "L",
              "I;16B": "L", "I;16L": "L", "I;16N": "L", "F": "L"}


def _target_mode(img: Image.Image) -> str:
    if img.mode in _KEPT:
        return img.mode
    if img.mode == "P":
        return "RGBA" if "transparency" in img.info else "RGB"
    return _CONVERTED.get(img.mode, "RGB")


#: Pixels of the largest image ``ue protect`` decodes by default (``--max_pixels``): PIL's own decompression-bomb
#: threshold, about 89.5 megapixels (PIL only warns there, and decodes up to twice as many).
MAX_PIXELS = Image.MAX_IMAGE_PIXELS


def read_photo(path: Path, max_pixels: int | None = MAX_PIXELS) -> Photo:
    """Decode ``path`` fully; raises :class:`UnreadableImage` (with PIL's reason) when it cannot, or, before
    decoding, when it has more than ``max_pixels`` pixels (None: no limit)."""
    try:
        with Image.open(path) as img:
            if max_pixels is not None and img.width * img.height > max_pixels:
                raise UnreadableImage(f"too large: {img.width}x{img.height} pixels, more than --max_pixels "
                                      f"{max_pixels} (decoding and protecting it could exhaust memory): raise "
                                      "--max_pixels to protect it")
            frames = getattr(img, "n_frames", 1)
            img.load()
            notes = []
            if img.getexif().get(EXIF_ORIENTATION, 1) != 1:
                notes.append("EXIF orientation applied")
            oriented = ImageOps.exif_transpose(img)
            mode = _target_mode(oriented)
            if mode != oriented.mode:
                notes.append(f"mode {oriented.mode} written as {mode}")
            converted = grey8(oriented) if mode == "L" else oriented
            converted = converted.convert(mode)
            icc = img.info.get("icc_profile")
    except UnreadableImage:
        raise
    except MemoryError:
        raise UnreadableImage("too large to decode in this machine's memory: lower --max_pixels to leave such "
                              "images out sooner") from None
    except DECODE_ERRORS as err:
        raise UnreadableImage(f"cannot be decoded ({type(err).__name__}: {err})") from None
    if frames > 1:
        notes.append(f"first of {frames} frames")
    array = torch.from_numpy(np.array(converted, dtype=np.uint8, copy=True))
    array = array.unsqueeze(-1) if array.ndim == 2 else array
    channels = array.permute(2, 0, 1).contiguous()  # (C, H, W)
    has_alpha = mode.endswith("A")
    return Photo(colour=channels[:-1] if has_alpha else channels, alpha=channels[-1:] if has_alpha else None,
                 note="; ".join(notes) or None, icc_profile=icc)


def write_png(photo: Photo, path: Path) -> None:
    """Write ``photo`` as a lossless PNG at ``path``, atomically (:func:`~ue_lightning.scratch.atomic_write_bytes`).

    A run killed mid-write leaves no file under ``path`` (only the sibling, which the next
    run for ``path`` removes: see :mod:`ue_lightning.scratch`).
    """
    channels = photo.colour if photo.alpha is None else torch.cat([photo.colour, photo.alpha])
    array = channels.permute(1, 2, 0).numpy()
    png = io.BytesIO()
    Image.fromarray(array[..., 0] if array.shape[2] == 1 else array).save(png, format="PNG",
                                                                           icc_profile=photo.icc_profile)
    atomic_write_bytes(path, png.getvalue())


@dataclass
class ImageJob:
    """An input image and where its protected PNG goes.

    Attributes:
        source: the input file.
        relative: its path relative to the input folder.
        output: the PNG to write (the relative path, suffix ``.png``).
        class_name: the top-level folder it lies in (None: a flat set, labels from the surrogate).
    """

    source: Path
    relative: Path
    output: Path
    class_name: str | None


def shown(path: Path | str) -> str:
    """``path`` as text for reports and messages: bytes of a name that are not UTF-8 (a Latin-1 ``café``) escaped
    as ``\\xe9``; Python keeps them as surrogates, which no UTF-8 file or terminal accepts."""
    return os.fsencode(str(path)).decode("utf-8", "backslashreplace")


def _visible_files(root: Path) -> tuple[list[Path], list[dict[str, str]]]:
    """Every file below ``root``, sorted; and what is not looked at, with why: hidden files and folders (a leading
    dot) and links to folders (not followed: they may lead outside ``root``, or round in a loop)."""
    found, left_out = [], []
    for folder, dirs, files in os.walk(root):
        here = Path(folder)
        kept = []
        for name in sorted(dirs):
            relative = shown((here / name).relative_to(root))
            if name.startswith("."):
                left_out.append({"path": relative, "reason": "a hidden folder (its name starts with a dot): not "
                                                             "looked into; rename it to protect what it holds"})
            elif (here / name).is_symlink():
                left_out.append({"path": relative, "reason": "a link to a folder: not followed (it may lead outside "
                                                             "--input); copy the folder in to protect it"})
            else:
                kept.append(name)
        dirs[:] = kept
        for name in sorted(files):
            if name.startswith("."):
                left_out.append({"path": shown((here / name).relative_to(root)),
                                 "reason": "a hidden file (its name starts with a dot): rename it to protect it"})
            else:
                found.append(here / name)
    return found, left_out


def find_images(input_dir: Path, output_dir: Path, reserved: tuple[str, ...] = ()
                ) -> tuple[list[ImageJob], list[dict[str, str]]]:
    """The images below ``input_dir`` and their outputs below ``output_dir``; and the files left out, with why.

    Classes are the top-level folder names when images lie in two or more of them (files at
    the top level are then the class ``.``); otherwise the set is flat. Left out: files
    without an image suffix, images whose output name is taken (by an earlier file, such
    as ``a.jpg`` before ``a.png``, or by one of the ``reserved`` names of the output folder),
    hidden files and folders, and links to folders. Paths in the list are :func:`shown`.
    """
    files, left_out = _visible_files(input_dir)
    images = [p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS]
    left_out += [{"path": shown(p.relative_to(input_dir)), "reason": "not an image suffix"}
                 for p in files if p.suffix.lower() not in IMAGE_EXTENSIONS]
    groups = {p.relative_to(input_dir).parts[0] if len(p.relative_to(input_dir).parts) > 1 else "."
              for p in images}
    nested = len(groups) >= 2
    jobs: list[ImageJob] = []
    taken = {output_dir / name: f"is reserved for the report ({name})" for name in reserved}
    for path in images:
        relative = path.relative_to(input_dir)
        output = output_dir / relative.with_suffix(".png")
        if output in taken:
            left_out.append({"path": shown(relative),
                             "reason": f"its output {shown(output.name)} {shown(taken[output])}: rename it"})
            continue
        taken[output] = f"is the output of {relative}"
        class_name = (relative.parts[0] if len(relative.parts) > 1 else ".") if nested else None
        jobs.append(ImageJob(path, relative, output, class_name))
    return jobs, left_out
