"""Large photos: noise made at a working size and stretched, or made at full size in tiles (issue 26).

No labelled set of large photos is on the CPU machines, so this enlarges a labelled set of small ones
(Tiny-ImageNet-10's 64-px JPEGs, bicubic, antialiased) into PNGs ``--scale`` times larger: a stand-in with no
detail finer than the originals (a real photo has some; say so beside any figure). Three steps:

* ``enlarge``: the class folders of ``--input`` at ``--scale`` times their size, as PNGs, into ``--output``;
* ``tile``: each photo of ``--input`` cut into ``--tile`` x ``--tile`` squares (``<stem>_r<i>c<j>.png``), same
  class folder, so ``ue protect --working_size 0`` makes each tile's noise at full resolution on its own;
* ``stitch``: the protected tiles of ``--input`` put back together, one PNG per photo, into ``--output``.

Then ``ue protect`` runs on the enlarged photos (``--working_size 64``: noise at the originals' scale, stretched;
``--working_size 0``: full size) and on the tiles, one quick surrogate for all (``--checkpoint``), and
``benchmarks/protect_owners.py`` trains the same victims on each (see benchmarks/RESULTS.md for the commands).
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import numpy as np
from PIL import Image

TILE_NAME = re.compile(r"^(?P<stem>.+)_r(?P<row>\d+)c(?P<col>\d+)\.png$")


def enlarge(source: Path, target: Path, scale: int) -> int:
    """Every image of ``source``'s class folders, ``scale`` times larger (bicubic), as PNG below ``target``."""
    count = 0
    for path in sorted(source.glob("*/*")):
        if path.suffix.lower() not in (".jpeg", ".jpg", ".png"):
            continue
        image = Image.open(path).convert("RGB")
        out = target / path.parent.name / (path.stem + ".png")
        out.parent.mkdir(parents=True, exist_ok=True)
        image.resize((image.width * scale, image.height * scale), Image.Resampling.BICUBIC).save(out)
        count += 1
    return count


def tile(source: Path, target: Path, side: int) -> int:
    """Every PNG of ``source``'s class folders cut into ``side`` x ``side`` squares (its sides must be multiples)."""
    count = 0
    for path in sorted(source.glob("*/*.png")):
        pixels = np.asarray(Image.open(path))
        h, w = pixels.shape[:2]
        if h % side or w % side:
            raise ValueError(f"{path} is {w}x{h}, not a multiple of --tile {side}: enlarge to a multiple first")
        (target / path.parent.name).mkdir(parents=True, exist_ok=True)
        for i in range(h // side):
            for j in range(w // side):
                piece = pixels[i * side:(i + 1) * side, j * side:(j + 1) * side]
                Image.fromarray(piece).save(target / path.parent.name / f"{path.stem}_r{i}c{j}.png")
                count += 1
    return count


def stitch(source: Path, target: Path) -> int:
    """The tiles of ``source`` (``<stem>_r<i>c<j>.png`` in class folders) put back into one PNG per photo."""
    photos: dict[tuple[str, str], dict[tuple[int, int], Path]] = {}
    for path in sorted(source.glob("*/*.png")):
        match = TILE_NAME.match(path.name)
        if match:
            photos.setdefault((path.parent.name, match["stem"]), {})[int(match["row"]), int(match["col"])] = path
    for (folder, stem), tiles in photos.items():
        rows = 1 + max(i for i, _ in tiles)
        cols = 1 + max(j for _, j in tiles)
        if len(tiles) != rows * cols:
            raise ValueError(f"{folder}/{stem}: {len(tiles)} tiles of a {rows}x{cols} grid (a tile is missing)")
        grid = [[np.asarray(Image.open(tiles[i, j])) for j in range(cols)] for i in range(rows)]
        (target / folder).mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.concatenate([np.concatenate(r, axis=1) for r in grid], axis=0)).save(
            target / folder / f"{stem}.png")
    return len(photos)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=["enlarge", "tile", "stitch"])
    parser.add_argument("--input", required=True, type=Path)
    parser.add_argument("--output", required=True, type=Path)
    parser.add_argument("--scale", type=int, default=2, help="enlarge: times the originals' side")
    parser.add_argument("--tile", type=int, default=64, help="tile: side of a tile, pixels")
    args = parser.parse_args()
    if args.output.exists() and any(args.output.iterdir()):
        parser.error(f"--output {args.output} is not empty: choose a new folder")
    if args.step == "enlarge":
        n = enlarge(args.input, args.output, args.scale)
    elif args.step == "tile":
        n = tile(args.input, args.output, args.tile)
    else:
        n = stitch(args.input, args.output)
    print(f"{args.step}: {n} images written below {args.output}")


if __name__ == "__main__":
    main()
