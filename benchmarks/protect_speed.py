"""How fast ``ue protect`` makes noise: photos a second at 64 px by batch size, and seconds per 12-MP photo.

Runs ``protect_folder`` itself (reading, PGD, writing the PNG, the report) with a given surrogate checkpoint, so
the quick surrogate's training is not timed (it is a fixed cost per folder: timed by ``ue protect`` runs in
benchmarks/RESULTS.md). The 12-MP photo is a real 64-px photo enlarged to 4000 x 3000 with a fine texture added
(a JPEG of quality 90, as a phone writes), so PNG encoding meets photo-like data.

    python benchmarks/protect_speed.py --photos ../shared/data/tiny-imagenet-10/train --checkpoint runs/surrogate.ckpt
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ue_lightning.protect import protect_folder


def small_folder(photos: Path, count: int, work: Path) -> Path:
    """``count`` photos, spread over the class folders of ``photos``, copied into ``work/small``."""
    classes = sorted(p for p in photos.iterdir() if p.is_dir())
    for k in range(count):
        folder = classes[k % len(classes)]
        source = sorted(folder.iterdir())[k // len(classes)]
        (work / "small" / folder.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(source, work / "small" / folder.name / source.name)
    return work / "small"


def large_folder(photos: Path, work: Path, size: tuple[int, int] = (4000, 3000)) -> Path:
    """Two 12-MP JPEGs (two classes): a real photo enlarged, plus a +-6 texture so it is not flat."""
    rng = np.random.default_rng(0)
    for k, folder in enumerate(sorted(p for p in photos.iterdir() if p.is_dir())[:2]):
        image = Image.open(sorted(folder.iterdir())[0]).convert("RGB").resize(size, Image.BICUBIC)
        array = np.asarray(image).astype(np.int16) + rng.integers(-6, 7, (size[1], size[0], 3))
        (work / "large" / folder.name).mkdir(parents=True, exist_ok=True)
        Image.fromarray(array.clip(0, 255).astype(np.uint8)).save(work / "large" / folder.name / "big.jpg",
                                                                 quality=90)
    return work / "large"


def timed(folder: Path, out: Path, checkpoint: str, **options) -> float:
    start = time.time()
    protect_folder(str(folder), str(out), checkpoint=checkpoint, device="cpu", grid_images=0, **options)
    return time.time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", required=True, help="a folder of 64-px photos in class folders")
    parser.add_argument("--checkpoint", required=True, help="the method's generator (ue protect's surrogate.ckpt)")
    parser.add_argument("--method", default="em", help="em, em-classwise, rem or collapse")
    parser.add_argument("--eot_jpeg", type=int, default=0, help="em: a JPEG quality the noise is made through")
    parser.add_argument("--eot_views", default="both", help="with --eot_jpeg: both (each step) or alternate")
    parser.add_argument("--count", type=int, default=320)
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--working_sizes", type=int, nargs="+", default=[256, 512])
    args = parser.parse_args()
    method = {"method": args.method,
              **({"eot_jpeg": args.eot_jpeg, "eot_views": args.eot_views} if args.eot_jpeg else {})}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        small = small_folder(Path(args.photos), args.count, work)
        for batch in args.batch_sizes:
            seconds = timed(small, work / f"out-b{batch}", args.checkpoint, batch_size=batch, **method)
            print(json.dumps({**method, "photos": args.count, "size": 64, "batch_size": batch,
                              "seconds": round(seconds, 1),
                              "photos_per_second": round(args.count / seconds, 2),
                              "threads": torch.get_num_threads()}), flush=True)
        large = large_folder(Path(args.photos), work)
        for working in args.working_sizes:
            seconds = timed(large, work / f"out-w{working}", args.checkpoint, working_size=working, **method)
            print(json.dumps({**method, "photos": 2, "size": "4000x3000", "working_size": working,
                              "seconds_per_photo": round(seconds / 2, 1), "threads": torch.get_num_threads()}),
                  flush=True)


if __name__ == "__main__":
    main()
