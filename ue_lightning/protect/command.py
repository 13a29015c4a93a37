"""``ue protect``: every image of a folder to a protected lossless PNG, resumably, with a report.

Steps: find the images (:mod:`.images`); get the generator (a checkpoint: :mod:`.surrogate`,
or a quick one trained on the folder and saved as ``<output>/surrogate.ckpt``: :mod:`.quick`);
per image, its noise at its own size (:mod:`.noise`), written atomically; then the report
(:mod:`.report`). A rerun with the same settings skips every image whose PNG is there and was
made from the same input (``inputs.jsonl``: size and SHA-256; a killed run resumes, a replaced
photo is done again); ``settings.json`` in the output refuses a rerun with other settings.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from ue_lightning.attacks import budget_to_pixels
from ue_lightning.data.noise_file import apply_delta
from ue_lightning.protect.images import (MAX_PIXELS, ImageJob, Photo, UnreadableImage, find_images, read_photo,
                                         shown, write_png)
from ue_lightning.protect.noise import class_pattern_delta, error_minimizing_delta, predicted_label
from ue_lightning.protect.quick import fit_quick_surrogate
from ue_lightning.protect.report import REPORT_FILES, image_quality, write_report
from ue_lightning.protect.surrogate import load_class_noise, load_surrogate
from ue_lightning.scratch import atomic_write_bytes

SETTINGS_FILE = "settings.json"
RECORD_FILE = "inputs.jsonl"
QUICK_CHECKPOINT = "surrogate.ckpt"
MODES = {"em": "samplewise", "em-classwise": "classwise"}


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


class InputRecords:
    """What each protected PNG was made from: ``inputs.jsonl`` in the output, one line per PNG written (the input's
    relative path, size, mtime and SHA-256), appended (and synced) after the PNG.

    A PNG of an earlier run counts as done only while its input is the one recorded (same size and content hash;
    the mtime alone is not trusted: ``cp -p`` and ``rsync -t`` keep it): a replaced photo is protected again, and a
    PNG written just before a kill, whose line is missing, is made again.
    """

    def __init__(self, path: Path):
        self.path = path
        self.seen: dict[str, dict[str, Any]] = {}
        lines = path.read_text(errors="replace").splitlines() if path.is_file() else []
        for line in lines:
            try:
                record = json.loads(line)
                self.seen[record["input"]] = record
            except (ValueError, KeyError, TypeError):  # a line cut short by a kill
                continue

    @staticmethod
    def of(source: Path, relative: str) -> dict[str, Any]:
        """The record of the input file ``source`` as it is now."""
        stat = source.stat()
        return {"input": relative, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": _sha256(source)}

    def unchanged(self, record: dict[str, Any]) -> bool:
        """Whether ``record`` is the input the recorded PNG was made from."""
        before = self.seen.get(record["input"])
        return before is not None and (before.get("size"), before.get("sha256")) == (record["size"], record["sha256"])

    def add(self, record: dict[str, Any]) -> None:
        """Record that the PNG of ``record``'s input was written (call after writing it)."""
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.seen[record["input"]] = record


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
    atomic_write_bytes(recorded, json.dumps(settings, indent=2).encode())


def _device(name: str) -> torch.device:
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("mps" if torch.backends.mps.is_available() else "cpu")


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


class SamplewiseNoise:
    """``--method em``: PGD at the image's size against the checkpoint's surrogate, towards the image's class
    (class i: the surrogate's label i mod K) or, in a flat folder, the surrogate's own prediction."""

    def __init__(self, checkpoint: str, classes: list[str], settings: dict[str, Any], device: torch.device):
        self.surrogate = load_surrogate(checkpoint, device)
        self.classes, self.settings = classes, settings
        self.num_classes = self.surrogate.num_classes

    def __call__(self, job: ImageJob, photo: Photo) -> tuple[int, Tensor]:
        """``(label, int8 delta (C, H, W) in 1/255 units)`` of one image."""
        label = (self.classes.index(job.class_name) % self.num_classes if job.class_name is not None
                 else predicted_label(self.surrogate, photo.colour))
        s = self.settings
        return label, error_minimizing_delta(self.surrogate, photo.colour, label, epsilon=s["epsilon"],
                                             steps=s["steps"], step_size=s["step_size"])


class ClasswiseNoise:
    """``--method em-classwise``: the class pattern of the checkpoint's class-wise EM, stretched over the image."""

    def __init__(self, checkpoint: str, classes: list[str], settings: dict[str, Any], device: torch.device):
        self.patterns = load_class_noise(checkpoint)  # (K, C, h, w), pixel units
        self.classes, self.epsilon = classes, settings["epsilon"]
        self.num_classes = len(self.patterns)

    def __call__(self, job: ImageJob, photo: Photo) -> tuple[int, Tensor]:
        """``(label, int8 delta (C, H, W) in 1/255 units)`` of one image."""
        label = self.classes.index(job.class_name) % self.num_classes
        return label, class_pattern_delta(self.patterns[label], photo.colour, self.epsilon)


NOISE_MAKERS = {"em": SamplewiseNoise, "em-classwise": ClasswiseNoise}


def protect_folder(
    input: str,
    output: str,
    checkpoint: str | None = None,
    method: Literal["em", "em-classwise"] = "em",
    epsilon: float = 8.0,
    steps: int = 20,
    step_size: float | None = None,
    seed: int = 0,
    grid_images: int = 6,
    device: str = "auto",
    max_pixels: int = MAX_PIXELS,
) -> dict[str, Any]:
    """Protect every image below --input with error-minimising noise; write PNGs and a report below --output.

    Subfolders of --input are classes (labels from their names); a flat folder is one set,
    labelled by the surrogate's predictions. Each image keeps its size and mode (grey, RGB,
    RGBA: alpha unchanged) and is written as a lossless PNG at the same relative path. A
    rerun continues a killed run, skipping the images already done.

    Args:
        input: the folder of images (never written to).
        output: the folder for the protected PNGs, report.json, report.md and grid.png (outside --input).
        checkpoint: a generator checkpoint (``last.ckpt`` of an ErrorMinimizingNoise fit, or for ``em`` of a
            RobustNoiseGenerator fit); without it, a quick EM generator is trained on the images and saved as
            <output>/surrogate.ckpt.
        method: ``em``: sample-wise error-minimising noise, PGD against the surrogate at each image's own
            size; ``em-classwise``: one pattern per class folder (class-wise EM), stretched over each image.
        epsilon: L-infinity budget in 1/255 units (8 = 8/255), in (0, 64].
        steps: PGD steps per image (``em``).
        step_size: PGD step in 1/255 units (None: 2.5 * epsilon / steps, at least 0.25).
        seed: seed of the quick generator, its training images and clusters.
        grid_images: images shown in grid.png (evenly spread over the folder).
        device: ``auto`` (a GPU if there is one), ``cpu``, ``cuda``, ``mps``, ...
        max_pixels: an image with more pixels is left out (and listed in the report) before it is decoded: a
            decompression bomb, or a photo too large to protect in memory (a 97 KB PNG can hold 10000x10000).
    """
    input_dir, output_dir = Path(input).resolve(), Path(output).resolve()
    if not input_dir.is_dir():
        raise NotADirectoryError(f"--input {input} is not a folder")
    _refuse_overlap(input_dir, output_dir)
    if method not in NOISE_MAKERS:
        raise ValueError(f"--method {method!r}: choose one of {', '.join(NOISE_MAKERS)}")
    budget_to_pixels(epsilon, "epsilon", allow_zero=False)
    if steps < 1:
        raise ValueError(f"--steps {steps} must be at least 1")
    step_size = max(2.5 * epsilon / steps, 0.25) if step_size is None else step_size
    budget_to_pixels(step_size, "step_size", allow_zero=False)
    jobs, skipped = find_images(input_dir, output_dir, reserved=REPORT_FILES)
    classes = sorted({job.class_name for job in jobs if job.class_name is not None})
    if method == "em-classwise" and not classes:
        raise ValueError(f"--method em-classwise needs class folders (--input {input} has images in fewer than two "
                         "subfolders): put each class in its own subfolder, or use --method em")
    run = _device(device)
    settings = {"method": method, "epsilon": float(epsilon), "steps": int(steps), "step_size": float(step_size),
                "seed": int(seed), "surrogate_sha256": "quick"}
    if checkpoint is not None:
        noise = NOISE_MAKERS[method](checkpoint, classes, settings, run)  # a wrong checkpoint: refused before writing
        settings["surrogate_sha256"] = _sha256(Path(checkpoint))
    _claim_output(output_dir, settings)
    if checkpoint is None:
        checkpoint = str(output_dir / QUICK_CHECKPOINT)
        if not Path(checkpoint).is_file():
            fit_quick_surrogate(jobs, classes, Path(checkpoint), mode=MODES[method], epsilon=epsilon, seed=seed,
                                device=run)
        noise = NOISE_MAKERS[method](checkpoint, classes, settings, run)
    notes = []
    if len(classes) > noise.num_classes:
        notes.append(f"{len(classes)} classes but the generator has {noise.num_classes}: classes share labels "
                     "(class i gets label i mod K), which weakens their protection")
    picks = set(np.linspace(0, len(jobs) - 1, min(grid_images, len(jobs))).round().astype(int).tolist())
    images, grid = [], []
    records = InputRecords(output_dir / RECORD_FILE)
    for i, job in enumerate(tqdm(jobs, desc="protecting", unit="img", file=sys.stderr)):
        entry, sample = _protect_one(job, noise, records, max_pixels)
        (images if "reason" not in entry else skipped).append(entry)
        if sample is not None and i in picks:
            grid.append(sample)
    report = {"settings": settings, "surrogate": shown(checkpoint), "input": shown(input_dir), "notes": notes,
              "images": images, "skipped": skipped}
    write_report(output_dir, report, grid, epsilon)
    done = sum(e["status"] == "protected" for e in images)
    print(f"{len(images)} images protected in {shown(output_dir)} ({done} in this run), {len(skipped)} left out: "
          f"see {shown(output_dir / 'report.md')}")
    return report


def _protect_one(job: ImageJob, noise: SamplewiseNoise | ClasswiseNoise, records: InputRecords, max_pixels: int
                 ) -> tuple[dict[str, Any], tuple[Tensor, Tensor] | None]:
    """Protect one image (or take its PNG of an earlier run, if made from this very input: ``records``).

    Returns its report entry (``{"path", "reason"}`` when it is left out) and, for the grid,
    ``(clean colour uint8 (C, H, W), int8 delta (C, H, W))`` (None when left out).
    """
    try:
        record = InputRecords.of(job.source, str(job.relative))
        photo = read_photo(job.source, max_pixels)
    except UnreadableImage as err:
        return {"path": shown(job.relative), "reason": str(err)}, None
    except OSError as err:  # gone, unreadable (permissions), a dangling link
        return {"path": shown(job.relative), "reason": f"cannot be read ({type(err).__name__}: {err.strerror})"}, None
    protected = _existing_output(job, photo) if records.unchanged(record) else None
    status, label = "done before", None
    if protected is None:
        try:
            label, delta = noise(job, photo)
        except (MemoryError, RuntimeError) as error:  # torch's CPU allocator raises a RuntimeError
            if not isinstance(error, (MemoryError, torch.OutOfMemoryError)) and "allocate memory" not in str(error):
                raise
            return {"path": shown(job.relative), "reason": f"too large for this device's memory ({photo.size}, "
                    f"{type(error).__name__}): lower --max_pixels to leave such images out sooner"}, None
        protected = Photo(apply_delta(photo.colour, delta), photo.alpha, photo.note, photo.icc_profile)
        write_png(protected, job.output)
        records.add(record)
        status = "protected"
    delta = (protected.colour.to(torch.int16) - photo.colour.to(torch.int16)).to(torch.int8)
    entry = {"input": shown(job.relative), "output": shown(job.relative.with_suffix(".png")),
             "class": None if job.class_name is None else shown(job.class_name),
             "label": label, "size": list(photo.size), "mode": photo.mode, "status": status, "note": photo.note,
             "input_sha256": record["sha256"],
             **image_quality(photo.colour, protected.colour)}
    return entry, (photo.colour, delta)
