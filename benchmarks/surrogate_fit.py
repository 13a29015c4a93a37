"""Has a ``ue protect`` surrogate learned its noise? Its accuracy on clean photos and on their protected PNGs.

A surrogate that learned its noise classifies the protected photos far better than the clean ones (the noise is a
shortcut it follows); one that did not is about as good on both, and its noise rarely protects. Eval mode, every
``--every``-th photo of the class folders.

    python benchmarks/surrogate_fit.py --photos ../shared/data/tiny-imagenet-10/train --outputs runs/ti10-em runs/ti10-rem
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ue_lightning.protect.images import read_photo
from ue_lightning.protect.surrogate import load_surrogate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", required=True, help="the clean photos (class folders) ue protect read")
    parser.add_argument("--outputs", nargs="+", required=True, help="ue protect output folders (surrogate.ckpt inside)")
    parser.add_argument("--every", type=int, default=10)
    args = parser.parse_args()
    root = Path(args.photos)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.parent.name in classes)[::args.every]
    labels = torch.tensor([classes.index(f.parent.name) for f in files])

    def batch(paths: list[Path]) -> torch.Tensor:
        return torch.stack([read_photo(p).colour.expand(3, -1, -1) for p in paths]).float() / 255

    clean = batch(files)
    for output in map(Path, args.outputs):
        surrogate = load_surrogate(output / "surrogate.ckpt", torch.device("cpu"))
        protected = batch([output / f.relative_to(root).with_suffix(".png") for f in files])
        on_clean = (surrogate.predict(clean) == labels).float().mean().item()
        on_protected = (surrogate.predict(protected) == labels).float().mean().item()
        print(f"{output.name}: surrogate accuracy on {len(files)} clean photos {on_clean:.3f}, "
              f"on their protected PNGs {on_protected:.3f}")


if __name__ == "__main__":
    main()
