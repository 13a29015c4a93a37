"""`ue protect --verify` on real photos (scikit-learn's 8x8 digits, enlarged to 24 px, in class folders).

The check must tell protection from none: the protected PNGs are written here by hand, once with a class-wise
pattern of +-16/255 in 8-pixel blocks (a shortcut every small victim takes), once as exact copies of the clean
photos.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ue_lightning.protect.images import find_images
from ue_lightning.protect.verify import VictimSettings, verify_protection

PER_CLASS = 30
SIZE = 24


def write_digits(root: Path) -> Path:
    from sklearn.datasets import load_digits

    digits = load_digits()
    for c in range(10):
        (root / f"digit{c}").mkdir(parents=True)
        for k, i in enumerate(np.flatnonzero(digits.target == c)[:PER_CLASS]):
            image = Image.fromarray((digits.images[i] * 255 / 16).astype(np.uint8)).resize((SIZE, SIZE),
                                                                                           Image.BILINEAR)
            image.convert("RGB").save(root / f"digit{c}" / f"{k}.png")
    return root


def write_outputs(photos: Path, output: Path, pattern: torch.Tensor | None):
    """The "protected" PNGs: each photo plus its class's pattern (int (10, 3, SIZE, SIZE), 1/255), or a copy."""
    jobs, _ = find_images(photos, output)
    classes = sorted({j.class_name for j in jobs})
    for job in jobs:
        image = torch.from_numpy(np.array(Image.open(job.source).convert("RGB"))).permute(2, 0, 1).int()
        if pattern is not None:
            image = (image + pattern[classes.index(job.class_name)]).clamp(0, 255)
        job.output.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image.byte().permute(1, 2, 0).numpy()).save(job.output)
    return jobs, classes


@pytest.fixture(scope="module")
def digit_photos(tmp_path_factory) -> Path:
    return write_digits(tmp_path_factory.mktemp("verify") / "photos")


def test_verify_tells_a_shortcut_from_no_protection(digit_photos, tmp_path):
    """Bound: clean victims learn the digits (>= 80% on the held-out 25%); a class-wise +-16/255 pattern leaves the
    protected victim at least 25 points lower (protected); copies of the clean photos stay within 10 points."""
    torch.manual_seed(0)
    pattern = (torch.randint(0, 2, (10, 3, 3, 3)) * 32 - 16).repeat_interleave(8, 2).repeat_interleave(8, 3)
    victim = VictimSettings(size=16, epochs=15)
    shortcut_jobs, classes = write_outputs(digit_photos, tmp_path / "shortcut", pattern)
    shortcut = verify_protection(shortcut_jobs, tmp_path / "shortcut", classes, share=0.25, platforms=(),
                                 victim=victim)["platforms"]["as written"]
    copy_jobs, _ = write_outputs(digit_photos, tmp_path / "copy", None)
    copy = verify_protection(copy_jobs, tmp_path / "copy", classes, share=0.25, platforms=(),
                             victim=victim)["platforms"]["as written"]
    assert shortcut["clean"]["test_acc"] >= 0.8 and copy["clean"]["test_acc"] >= 0.8
    assert shortcut["verdict"] == "protected", shortcut
    assert shortcut["protected"]["train_acc"] > shortcut["protected"]["test_acc"] + 0.25  # it learned the pattern
    assert copy["verdict"] == "NOT protected", copy
    assert abs(copy["protected"]["test_acc"] - copy["clean"]["test_acc"]) <= 0.1
