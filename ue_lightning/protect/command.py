"""``ue protect``: every image of a folder to a protected lossless PNG, resumably, with a report.

Steps: find the images (:mod:`.images`); get a surrogate (a checkpoint, or a quick one
trained on the folder and saved as ``<output>/surrogate.ckpt``: :mod:`.surrogate`); per
image, PGD noise at the image's own size (:mod:`.noise`), written atomically; then the
report (:mod:`.report`). A rerun with the same settings skips every image whose PNG is
there (a killed run resumes); ``settings.json`` in the output refuses a rerun with others.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torchvision.transforms.v2 import functional as TF
from tqdm import tqdm

from ue_lightning.attacks import budget_to_pixels
from ue_lightning.data.noise_file import apply_delta
from ue_lightning.protect.images import ImageJob, Photo, UnreadableImage, find_images, read_photo, write_png
from ue_lightning.protect.noise import error_minimizing_delta, predicted_label
from ue_lightning.protect.report import REPORT_FILES, image_quality, write_report
from ue_lightning.protect.surrogate import (Surrogate, cluster_labels, load_surrogate, train_quick_surrogate,
                                           working_crops)

SETTINGS_FILE = "settings.json"
QUICK_CHECKPOINT = "surrogate.ckpt"
WORKING_SIZE = 32  # side of the quick surrogate's training crops, pixels
CROPS_PER_IMAGE = 4


def _refuse_overlap(input_dir: Path, output_dir: Path) -> None:
    inside = output_dir == input_dir or input_dir in output_dir.parents or output_dir in input_dir.parents
    if inside:
        raise ValueError(f"--output {output_dir} and --input {input_dir} overlap (one is inside the other, or they "
                         "are the same): choose an output folder outside the input, so no input can be overwritten")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _claim_output(output_dir: Path, settings: dict[str, Any]) -> None:
    """Create the output folder, or check that it holds an earlier run with the same settings (a resume)."""
    recorded = output_dir / SETTINGS_FILE
    if recorded.is_file():
        before = json.loads(recorded.read_text())
        if before != settings:
            diffs = ", ".join(f"{k}: {before.get(k)!r} before, {settings.get(k)!r} now"
                              for k in sorted(set(before) | set(settings)) if before.get(k) != settings.get(k))
            raise ValueError(f"--output {output_dir} holds a run with other settings ({diffs}): rerun with those "
                             "settings to resume it, or choose a new --output folder")
        return
    if output_dir.exists() and any(output_dir.iterdir()):
        raise FileExistsError(f"--output {output_dir} exists, is not empty and was not written by ue protect: "
                              "choose a new folder (nothing was written)")
    output_dir.mkdir(parents=True, exist_ok=True)
    recorded.write_text(json.dumps(settings, indent=2))


def _device(name: str) -> torch.device:
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("mps" if torch.backends.mps.is_available() else "cpu")


def _readable(jobs: list[ImageJob]):
    """``(job, photo)`` for each job whose image decodes (the others are reported by the main pass)."""
    for job in jobs:
        try:
            yield job, read_photo(job.source)
        except UnreadableImage:
            continue


def _quick_surrogate(jobs: list[ImageJob], classes: list[str], checkpoint: Path, epsilon: float, seed: int,
                     device: torch.device) -> None:
    """Train the quick surrogate on crops of the images (labels: their classes, or k-means clusters)."""
    generator = torch.Generator().manual_seed(seed)
    crops, labels, thumbnails = [], [], []
    for job, photo in tqdm(_readable(jobs), total=len(jobs), desc="reading crops", unit="img", file=sys.stderr):
        crops.append(working_crops(photo.colour, WORKING_SIZE, CROPS_PER_IMAGE, generator))
        labels.append(classes.index(job.class_name) if classes else -1)
        thumbnails.append(TF.resize(photo.colour.expand(3, -1, -1), [16, 16], antialias=True))
    if not crops:
        raise ValueError("no readable image to train a quick surrogate on: see the files named above")
    image_labels = np.asarray(labels) if classes else cluster_labels(torch.stack(thumbnails), seed)
    print(f"training a quick surrogate on {len(crops) * CROPS_PER_IMAGE} crops of {len(crops)} images "
          f"({len(np.unique(image_labels))} classes) ...", file=sys.stderr, flush=True)
    train_quick_surrogate(torch.cat(crops), np.repeat(image_labels, CROPS_PER_IMAGE), checkpoint, epsilon=epsilon,
                          seed=seed, accelerator="cpu" if device.type == "cpu" else "auto")


def _existing_output(job: ImageJob, photo: Photo) -> Photo | None:
    """The protected PNG of an earlier run, if it is there and fits the input (same size, mode and alpha)."""
    if not job.output.is_file():
        return None
    try:
        done = read_photo(job.output)
    except UnreadableImage:
        return None
    same_alpha = (done.alpha is None) == (photo.alpha is None) and (
        photo.alpha is None or torch.equal(done.alpha, photo.alpha))
    return done if done.colour.shape == photo.colour.shape and same_alpha else None


def protect_folder(
    input: str,
    output: str,
    checkpoint: str | None = None,
    method: Literal["em"] = "em",
    epsilon: float = 8.0,
    steps: int = 20,
    step_size: float | None = None,
    seed: int = 0,
    grid_images: int = 6,
    device: str = "auto",
) -> dict[str, Any]:
    """Protect every image below --input with error-minimising noise; write PNGs and a report below --output.

    Subfolders of --input are classes (labels from their names); a flat folder is one set,
    labelled by the surrogate's predictions. Each image keeps its size and mode (grey, RGB,
    RGBA: alpha unchanged) and is written as a lossless PNG at the same relative path. A
    rerun continues a killed run, skipping the images already done.

    Args:
        input: the folder of images (never written to).
        output: the folder for the protected PNGs, report.json, report.md and grid.png (outside --input).
        checkpoint: a generator checkpoint whose surrogate makes the noise (ErrorMinimizingNoise or
            RobustNoiseGenerator ``last.ckpt``); without it, a quick sample-wise EM surrogate is trained
            on 32x32 crops of the images and saved as <output>/surrogate.ckpt.
        method: ``em``: sample-wise error-minimising noise, PGD at each image's own size.
        epsilon: L-infinity budget in 1/255 units (8 = 8/255), in (0, 64].
        steps: PGD steps per image.
        step_size: PGD step in 1/255 units (None: 2.5 * epsilon / steps, at least 0.25).
        seed: seed of the quick surrogate, its crops and clusters.
        grid_images: images shown in grid.png (evenly spread over the folder).
        device: ``auto`` (a GPU if there is one), ``cpu``, ``cuda``, ``mps``, ...
    """
    input_dir, output_dir = Path(input).resolve(), Path(output).resolve()
    if not input_dir.is_dir():
        raise NotADirectoryError(f"--input {input} is not a folder")
    _refuse_overlap(input_dir, output_dir)
    if method != "em":
        raise ValueError(f"--method {method!r}: only em (sample-wise error-minimising noise) is available")
    budget_to_pixels(epsilon, "epsilon", allow_zero=False)
    if steps < 1:
        raise ValueError(f"--steps {steps} must be at least 1")
    step_size = max(2.5 * epsilon / steps, 0.25) if step_size is None else step_size
    budget_to_pixels(step_size, "step_size", allow_zero=False)
    run = _device(device)
    surrogate = load_surrogate(checkpoint, run) if checkpoint is not None else None  # refused before writing
    settings = {"method": method, "epsilon": float(epsilon), "steps": int(steps), "step_size": float(step_size),
                "seed": int(seed), "surrogate_sha256": _sha256(Path(checkpoint)) if checkpoint else "quick"}
    _claim_output(output_dir, settings)
    jobs, skipped = find_images(input_dir, output_dir, reserved=REPORT_FILES)
    classes = sorted({job.class_name for job in jobs if job.class_name is not None})
    if surrogate is None:
        checkpoint = str(output_dir / QUICK_CHECKPOINT)
        if not Path(checkpoint).is_file():
            _quick_surrogate(jobs, classes, Path(checkpoint), epsilon, seed, run)
        surrogate = load_surrogate(checkpoint, run)
    notes = []
    if len(classes) > surrogate.num_classes:
        notes.append(f"{len(classes)} classes but the surrogate has {surrogate.num_classes}: classes share "
                     "surrogate labels (class i gets label i mod K), which weakens their protection")
    picks = set(np.linspace(0, len(jobs) - 1, min(grid_images, len(jobs))).round().astype(int).tolist())
    images, grid = [], []
    for i, job in enumerate(tqdm(jobs, desc="protecting", unit="img", file=sys.stderr)):
        entry = _protect_one(job, classes, surrogate, settings, i in picks, grid)
        (images if "reason" not in entry else skipped).append(entry)
    report = {"settings": settings, "surrogate": checkpoint, "input": str(input_dir), "notes": notes,
              "images": images, "skipped": skipped}
    write_report(output_dir, report, grid, epsilon)
    done = sum(e["status"] == "protected" for e in images)
    print(f"{len(images)} images protected in {output_dir} ({done} in this run), {len(skipped)} left out: "
          f"see {output_dir / 'report.md'}")
    return report


def _protect_one(job: ImageJob, classes: list[str], surrogate: Surrogate, settings: dict[str, Any],
                 keep_for_grid: bool, grid: list) -> dict[str, Any]:
    """Protect one image (or take its earlier PNG); its report entry, or ``{"path", "reason"}`` when left out."""
    try:
        photo = read_photo(job.source)
    except UnreadableImage as err:
        return {"path": str(job.relative), "reason": str(err)}
    protected = _existing_output(job, photo)
    status, label = "done before", None
    if protected is None:
        label = (classes.index(job.class_name) % surrogate.num_classes if job.class_name is not None
                 else predicted_label(surrogate, photo.colour))
        try:
            delta = error_minimizing_delta(surrogate, photo.colour, label, epsilon=settings["epsilon"],
                                           steps=settings["steps"], step_size=settings["step_size"])
        except torch.OutOfMemoryError:
            return {"path": str(job.relative), "reason": f"too large for this device's memory ({photo.size})"}
        protected = Photo(apply_delta(photo.colour, delta), photo.alpha, photo.note, photo.icc_profile)
        write_png(protected, job.output)
        status = "protected"
    if keep_for_grid:
        grid.append((photo.colour, (protected.colour.to(torch.int16) - photo.colour.to(torch.int16)).to(torch.int8)))
    return {"input": str(job.relative), "output": str(job.relative.with_suffix(".png")),
            "class": job.class_name, "label": label, "size": list(photo.size), "mode": photo.mode,
            "status": status, "note": photo.note, **image_quality(photo.colour, protected.colour)}
