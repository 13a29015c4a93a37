"""``ue protect --verify``: does a model that trains on the protected photos learn them? A check on the owner's photos.

A seeded share of each class's photos is held out as clean test images. Two quick victims
(the package's :class:`~ue_lightning.modules.VictimClassifier`, run by a Lightning Trainer)
train on the rest, one on the protected PNGs and one on the clean inputs; each is scored on the
photos it trained on and on the held-out clean ones. The same again for each platform: what a
photo site does to a published photo before anyone downloads it (re-encoding as JPEG, resizing),
applied to the full-size photo, clean and protected alike, and to the held-out photos (a model
is used on photos like the ones it was trained on: a victim trained on half-size photos and
scored on full-size ones would lose accuracy to the change of resolution, not to the noise).
Victims see every photo squeezed to ``size x size`` pixels (the whole photo, aspect not kept),
with random crops and flips.

It is a check on these photos against this victim, not a guarantee: another model, more data
or a defence (``docs/defences.md``) can learn more.
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import Tensor
from torchvision.transforms.v2 import functional as TF

from ue_lightning.console import quiet_lightning
from ue_lightning.data.datamodule import UEDataModule
from ue_lightning.modules.victim import VictimClassifier
from ue_lightning.protect.images import ImageJob, read_photo
from ue_lightning.protect.platforms import DEFAULT_PLATFORMS, PlatformFn, parse_platform
from ue_lightning.scratch import scratch_dir

@dataclass
class VictimSettings:
    """The quick victim: the package's fast net (``airbench`` at ``width``; its patch whitening left unfitted,
    which would enlarge faint noise and overstate protection: docs/fast-victim.md) for ``epochs`` of batch
    ``batch_size`` at ``size`` pixels, with the fast victim's optimiser (configs/victim/airbench-cpu.yaml),
    random crops (padding size/8) and flips."""

    size: int = 64
    arch: str = "airbench"
    width: int = 16
    epochs: int = 8
    batch_size: int = 128

    def classifier(self, num_classes: int) -> VictimClassifier:
        fast = dict(lr=0.8, momentum=0.9, nesterov=True, weight_decay=5e-4, schedule="triangular", warmup=0.2,
                    label_smoothing=0.2, fit_whitening=False) if self.arch == "airbench" else {}
        return VictimClassifier(arch=self.arch, width=self.width, num_classes=num_classes, in_channels=3,
                                image_size=self.size, **fast)


def held_out(labels: np.ndarray, share: float, seed: int) -> np.ndarray:
    """bool (N,): a seeded ``share`` of each class (at least one photo, and at least one left to train on)."""
    rng = np.random.default_rng(seed)
    mask = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        if len(members) < 2:
            continue
        count = min(len(members) - 1, max(1, round(share * len(members))))
        mask[rng.choice(members, count, replace=False)] = True
    return mask


def victim_input(colour: Tensor, size: int, platform: PlatformFn | None) -> Tensor:
    """uint8 (3, size, size): a photo (C, H, W) as the victim sees it (grey repeated, platform applied, squeezed)."""
    image = colour.expand(3, -1, -1).contiguous()
    if platform is not None:
        image = platform(image)
    return TF.resize(image, [size, size], antialias=True)


def train_and_score(train_x: Tensor, train_y: np.ndarray, test_x: Tensor, test_y: np.ndarray,
                    victim: VictimSettings, seed: int, work: Path) -> dict[str, float]:
    """Fit the quick victim on uint8 images ``train_x`` (N, 3, s, s); its accuracy (in [0, 1]) on them
    (unaugmented) and on ``test_x``: ``{"train_acc", "test_acc"}``."""
    data = work / f"victim-{seed}.npz"
    np.savez(data, x_train=train_x.permute(0, 2, 3, 1).numpy(), y_train=train_y,
             x_test=test_x.permute(0, 2, 3, 1).numpy(), y_test=test_y)
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    L.seed_everything(seed, verbose=False)
    dm = UEDataModule("npz", root=str(data), batch_size=min(victim.batch_size, len(train_x)), seed=seed)
    model = victim.classifier(num_classes)
    with quiet_lightning():
        trainer = L.Trainer(max_epochs=victim.epochs, accelerator="cpu", devices=1, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            default_root_dir=str(work), num_sanity_val_steps=0, limit_val_batches=0)
        trainer.fit(model, datamodule=dm)
    return {"train_acc": accuracy(model, train_x, train_y), "test_acc": accuracy(model, test_x, test_y)}


@torch.no_grad()
def accuracy(model: torch.nn.Module, images: Tensor, labels: np.ndarray, batch_size: int = 256) -> float:
    """Share in [0, 1] of uint8 ``images`` (N, 3, s, s) that ``model`` (eval mode) puts in their class ``labels``."""
    model.eval()
    right = 0
    for start in range(0, len(images), batch_size):
        x = images[start:start + batch_size].float() / 255.0
        right += int((model(x).argmax(1).numpy() == labels[start:start + batch_size]).sum())
    return right / len(images)


def verdict(protected: float, clean: float, num_classes: int) -> str:
    """One word: ``protected`` when the protected victim's test accuracy is at least 25 points below the clean
    one's, or within 5 points of chance; ``partly protected`` at 10 points or more; else ``NOT protected``."""
    drop = clean - protected
    if drop >= 0.25 or (drop >= 0.1 and protected <= 1.0 / num_classes + 0.05):
        return "protected"
    return "partly protected" if drop >= 0.1 else "NOT protected"


def check_verify_options(classes: list[str], share: float, platforms: list[str] | tuple[str, ...], size: int,
                         epochs: int) -> None:
    """Refuse bad ``--verify`` options before anything is protected (one line naming the fix each)."""
    if len(classes) < 2:
        raise ValueError("--verify needs class folders (two or more subfolders of --input, one per class): the "
                         "check trains a classifier on them; or leave --verify out")
    if not 0 < share <= 0.5:
        raise ValueError(f"--verify_share {share} must be in (0, 0.5]: the share of each class held out as clean "
                         "test photos (0.1: one in ten)")
    for spec in platforms:
        parse_platform(spec)
    if size < 16:
        raise ValueError(f"--verify_size {size} must be at least 16 (pixels a side the victims see)")
    if epochs < 1:
        raise ValueError(f"--verify_epochs {epochs} must be at least 1")


def verify_protection(jobs: list[ImageJob], output_dir: Path, classes: list[str], *, share: float = 0.1,
                      platforms: tuple[str, ...] = DEFAULT_PLATFORMS, victim: VictimSettings | None = None,
                      seed: int = 0) -> dict[str, Any]:
    """Train the quick victims on the protected photos of ``jobs`` (their PNGs below ``output_dir``) and on the
    clean ones, as written and after each platform; return the accuracies and verdicts (see the module doc).

    ``jobs``: the photos that were protected (their PNGs are there). ``share``: fraction of each class held out as
    clean test photos, in (0, 0.5]. ``seed``: the hold-out draw and the victims' seed.
    """
    victim = victim or VictimSettings()
    check_verify_options(classes, share, platforms, victim.size, victim.epochs)
    chosen = [parse_platform(p) for p in platforms]
    labels = np.asarray([classes.index(job.class_name) for job in jobs], dtype=np.int64)
    test = held_out(labels, share, seed)
    if not test.any():
        raise ValueError("--verify needs at least two protected photos in some class (one to hold out, one to train "
                         "on): add photos, or leave --verify out")
    clean = [read_photo(job.source, None).colour for job in jobs]
    protected = [read_photo(job.output, None).colour for job in jobs]
    test_y, train_y = labels[test], labels[~test]
    print(f"verifying: quick victims ({victim.arch} width {victim.width}, {victim.epochs} epochs at {victim.size} px) "
          f"on {len(train_y)} photos, scored on {len(test_y)} held out ...", file=sys.stderr, flush=True)
    rows: dict[str, dict[str, Any]] = {}
    work = scratch_dir(output_dir / "verify", ".train")
    try:
        for name, fn in [("as written", None), *chosen]:
            row = {}
            test_x = torch.stack([victim_input(c, victim.size, fn) for c, t in zip(clean, test) if t])
            for data, images in (("clean", clean), ("protected", protected)):
                train_x = torch.stack([victim_input(p, victim.size, fn) for p, t in zip(images, test) if not t])
                row[data] = train_and_score(train_x, train_y, test_x, test_y, victim, seed, work)
            row["verdict"] = verdict(row["protected"]["test_acc"], row["clean"]["test_acc"], len(classes))
            rows[name] = row
            print(f"  {name}: clean {_pct(row['clean'])}, protected {_pct(row['protected'])}: {row['verdict']}",
                  file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"held_out_share": share, "train_photos": int(len(train_y)), "test_photos": int(len(test_y)),
            "seed": seed, "victim": vars(victim), "platforms": rows}


def _pct(scores: dict[str, float]) -> str:
    return f"train {100 * scores['train_acc']:.1f}% / test {100 * scores['test_acc']:.1f}%"


def markdown(verify: dict[str, Any]) -> list[str]:
    """The report.md section of a ``verify`` result."""
    v = verify["victim"]
    lines = ["## Does a model learn these photos? (--verify)", "",
             f"{verify['test_photos']} photos ({verify['held_out_share']:.0%} of each class, seed {verify['seed']}) "
             f"held out clean; a quick victim ({v['arch']}, width {v['width']}, {v['epochs']} epochs at {v['size']} px) "
             f"trained on the other {verify['train_photos']}, protected or clean. Accuracy on the photos it trained on / on the "
             "held-out clean photos:", "",
             "| published | clean photos | protected photos | verdict |", "|---|---|---|---|"]
    for name, row in verify["platforms"].items():
        lines.append(f"| {name} | {_pct(row['clean'])} | {_pct(row['protected'])} | {row['verdict']} |")
    lines += ["", "Protected: the protected victim's held-out accuracy is 25 or more points below the clean "
              "victim's. This is a check on these photos against one small model, not a guarantee.", ""]
    return lines
