"""What purification with the thief's score model keeps of an image and of a perturbation, before any victim.

    OMP_NUM_THREADS=1 python benchmarks/purification_check.py [--checkpoint runs/score/cifar10-npz-thief/checkpoints/last.ckpt]

On the first 300 images of the CPU protocol's subset: the PSNR of the purified clean image
against the clean one, and how much of two 8/255 perturbations survives purification (RMS,
0-255 units, of purified(x + delta) - purified(x), both with the same purification noise):
a high-frequency one (a random +-8 sign per pixel, like sample-wise EM) and a low-frequency one
(a constant colour offset (+8, -8, +8), like TUE's view-robust class-wise noise).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SHARED_NPZ  # noqa: E402

from ue_lightning.data import UEDataModule  # noqa: E402
from ue_lightning.modules import ScoreEstimator  # noqa: E402
from ue_lightning.data.purification import tweedie_denoise  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).pow(2).mean().sqrt().item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default=str(REPO / "runs/score/cifar10-npz-thief/checkpoints/last.ckpt"))
    p.add_argument("--images", type=int, default=300)
    a = p.parse_args()
    torch.set_num_threads(1)
    dm = UEDataModule("npz", root=str(SHARED_NPZ), train_subset=5000)
    train = dm.clean_split("train")
    index = dm.train_indices()[:a.images]
    x, y = train.image_batch(index.tolist()), train.targets[index]
    model = ScoreEstimator.load_for(a.checkpoint, num_classes=10, in_channels=3, image_size=32)

    def purified(images: torch.Tensor) -> torch.Tensor:
        return tweedie_denoise(images, y, index, model.score, model.sigma_min, seed=0)

    clean = purified(x)
    print(f"sigma {model.sigma_min:.3g}; purified clean images: PSNR {10 * math.log10(255 ** 2 / rms(clean, x) ** 2):.1f} dB")
    g = torch.Generator().manual_seed(0)
    perturbations = {"random +-8 sign a pixel": (torch.randint(0, 2, x.shape, generator=g) * 16 - 8).short(),
                     "constant colour offset (+8, -8, +8)": torch.tensor([8, -8, 8]).view(1, 3, 1, 1).expand_as(x).short()}
    for name, delta in perturbations.items():
        protected = (x.short() + delta).clamp(0, 255).to(torch.uint8)
        before, after = rms(protected, x), rms(purified(protected), clean)
        print(f"{name}: RMS {before:.2f} before, {after:.2f} after purification ({after / before:.0%} kept)")


if __name__ == "__main__":
    main()
