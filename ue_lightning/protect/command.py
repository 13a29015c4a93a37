"""``ue protect``: every image of a folder to a protected lossless PNG, resumably, with a report.

Steps: find the images (:mod:`.images`); get the generator (a checkpoint: :mod:`.surrogate`,
or a quick one trained on the folder and saved as ``<output>/surrogate.ckpt``: :mod:`.quick`);
the photos in batches of one size (:mod:`.batches`), each with the noise of its ``--method``
(:mod:`.methods`, :mod:`.noise`), written atomically; then the report (:mod:`.report`) and, with
``--verify``, a check that a model trained on the output does not learn it (:mod:`.verify`). A rerun with the same settings skips every image whose PNG is there and was
made from the same input (``inputs.jsonl``: size and SHA-256; a killed run resumes, a replaced
photo is done again); ``settings.json`` in the output refuses a rerun with other settings.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from ue_lightning.ops.attacks import budget_to_pixels
from ue_lightning.protect.batches import MIN_WORKING_SIZE, Done, InputRecords, SizeBatches, sha256
from ue_lightning.protect.images import MAX_PIXELS, find_images, shown
from ue_lightning.protect.methods import MODES, NOISE_MAKERS
from ue_lightning.protect.quick import fit_quick_surrogate
from ue_lightning.protect.report import REPORT_FILES, write_report
from ue_lightning.protect.verify import DEFAULT_PLATFORMS, VictimSettings, check_verify_options, verify_protection
from ue_lightning.scratch import atomic_write_json

SETTINGS_FILE = "settings.json"
RECORD_FILE = "inputs.jsonl"
QUICK_CHECKPOINT = "surrogate.ckpt"
QUICK_SCORE_CHECKPOINT = "score.ckpt"


def _refuse_overlap(input_dir: Path, output_dir: Path) -> None:
    inside = output_dir == input_dir or input_dir in output_dir.parents or output_dir in input_dir.parents
    if inside:
        raise ValueError(f"--output {output_dir} and --input {input_dir} overlap (one is inside the other, or they "
                         "are the same): choose an output folder outside the input, so no input can be overwritten")


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
    atomic_write_json(recorded, settings)


def _device(name: str) -> torch.device:
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("mps" if torch.backends.mps.is_available() else "cpu")


def protect_folder(
    input: str,
    output: str,
    checkpoint: str | None = None,
    score_checkpoint: str | None = None,
    method: Literal["em", "em-classwise", "rem", "collapse"] = "em",
    epsilon: float = 8.0,
    steps: int = 20,
    step_size: float | None = None,
    working_size: int = 256,
    eot_jpeg: int = 0,
    eot_views: Literal["both", "alternate"] = "both",
    batch_size: int = 32,
    seed: int = 0,
    grid_images: int = 6,
    device: str = "auto",
    max_pixels: int = MAX_PIXELS,
    verify: bool = False,
    verify_share: float = 0.1,
    verify_platforms: list[str] = list(DEFAULT_PLATFORMS),
    verify_size: int = 64,
    verify_epochs: int = VictimSettings.epochs,
) -> dict[str, Any]:
    """Protect every image below --input with error-minimising noise; write PNGs and a report below --output.

    Subfolders of --input are classes (labels from their names); a flat folder is one set,
    labelled by the surrogate's predictions. Each image keeps its size and mode (grey, RGB,
    RGBA: alpha unchanged) and is written as a lossless PNG at the same relative path. A
    rerun continues a killed run, skipping the images already done.

    Args:
        input: the folder of images (never written to).
        output: the folder for the protected PNGs, report.json, report.md and grid.png (outside --input).
        checkpoint: a generator checkpoint (``last.ckpt`` of an ErrorMinimizingNoise fit, or of a
            RobustNoiseGenerator fit for ``rem`` and ``collapse``, and for ``em`` too); without it, a quick generator
            of the method is trained on the images and saved as <output>/surrogate.ckpt.
        score_checkpoint: ``collapse`` with a ``--checkpoint``: the ScoreEstimator checkpoint of its score step
            (None: the one the generator was fitted with). Without ``--checkpoint`` a quick one is trained on the
            images and saved as <output>/score.ckpt.
        method: ``em``: sample-wise error-minimising noise, PGD against the surrogate at each image's own
            size; ``em-classwise``: one pattern per class folder (class-wise EM), stretched over each image;
            ``rem``: robust error-minimising noise (REM: against an adversarially trained surrogate, under a PGD
            adversary and random crops and flips), meant to survive a trainer's adversarial training;
            ``collapse``: data collapse (Fang et al.): REM's step plus a step down the norm of a class-conditional
            score model, so each class's photos collapse towards dense points of the class.
        epsilon: L-infinity budget in 1/255 units (8 = 8/255), in (0, 64].
        steps: PGD steps per image (``em``; ``rem`` takes its generator's own).
        step_size: PGD step in 1/255 units (None: 2.5 * epsilon / steps, at least 0.25).
        working_size: ``em``: an image whose longer side is larger gets its noise made at this longer side
            (pixels; shrunk, aspect kept) and stretched back over it; 0: always at full size.
        eot_jpeg: ``em``: a JPEG quality (1-95) the noise is also made to work through (the photo as written and
            its JPEG round trip, each step; twice the time); 0: off.
        eot_views: with ``--eot_jpeg``: ``both`` views each step (twice the time), or ``alternate``: the photo as
            written and its JPEG round trip on alternate steps (the time of plain ``em``).
        batch_size: images of one size put through PGD together (fewer when they are large: at most
            2**20 working pixels a batch). Speed only: the noise is each image's own.
        seed: seed of the quick generator, its training images and clusters.
        grid_images: images shown in grid.png (evenly spread over the folder).
        device: ``auto`` (a GPU if there is one), ``cpu``, ``cuda``, ``mps``, ...
        max_pixels: an image with more pixels is left out (and listed in the report) before it is decoded: a
            decompression bomb, or a photo too large to protect in memory (a 97 KB PNG can hold 10000x10000).
        verify: after protecting, check that a model trained on the protected photos does not learn them
            (:mod:`ue_lightning.protect.verify`): quick victims on protected and on clean photos, as written and
            after each of ``verify_platforms``; accuracies and verdicts go into report.md and report.json.
        verify_share: share of each class held out as clean test photos (seeded by ``seed``).
        verify_platforms: what a photo site does before anyone downloads: ``jpeg:<quality>``, ``resize:<scale>``.
        verify_size: side (pixels) the victims see each photo squeezed to.
        verify_epochs: the victims' epochs (8: the measured victim of docs/protect.md).
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
    if batch_size < 1:
        raise ValueError(f"--batch_size {batch_size} must be at least 1")
    if working_size != 0 and working_size < MIN_WORKING_SIZE:
        raise ValueError(f"--working_size {working_size} is too small: use 0 (full size) or at least "
                         f"{MIN_WORKING_SIZE} pixels (the surrogate's own input is 32)")
    if eot_jpeg and (method != "em" or not 1 <= eot_jpeg <= 95):
        raise ValueError(f"--eot_jpeg {eot_jpeg}: give a JPEG quality in 1..95 (0: off), with --method em (the "
                         "other methods do not take it)")
    step_size = max(2.5 * epsilon / steps, 0.25) if step_size is None else step_size
    budget_to_pixels(step_size, "step_size", allow_zero=False)
    jobs, skipped = find_images(input_dir, output_dir, reserved=REPORT_FILES)
    classes = sorted({job.class_name for job in jobs if job.class_name is not None})
    if verify:
        check_verify_options(classes, verify_share, verify_platforms, verify_size, verify_epochs)
    if score_checkpoint is not None and (method != "collapse" or checkpoint is None):
        raise ValueError("--score_checkpoint goes with --method collapse and its --checkpoint (a quick collapse "
                         "generator trains its own score model): drop it, or add them")
    if method == "em-classwise" and not classes:
        raise ValueError(f"--method em-classwise needs class folders (--input {input} has images in fewer than two "
                         "subfolders): put each class in its own subfolder, or use --method em")
    run = _device(device)
    settings = {"method": method, "epsilon": float(epsilon), "steps": int(steps), "step_size": float(step_size),
                "working_size": int(working_size) or None, "seed": int(seed), "surrogate_sha256": "quick"}
    if eot_views not in ("both", "alternate") or (eot_views != "both" and not eot_jpeg):
        raise ValueError(f"--eot_views {eot_views!r}: choose both or alternate, with --eot_jpeg (it says how the "
                         "JPEG round trip is taken)")
    if eot_jpeg:  # recorded only when on: an earlier run's settings.json stays valid for a resume
        settings["eot_jpeg"] = int(eot_jpeg)
        if eot_views != "both":
            settings["eot_views"] = eot_views
    if checkpoint is not None:
        noise = NOISE_MAKERS[method](checkpoint, classes, dict(settings, score_checkpoint=score_checkpoint),
                                     run)  # a wrong checkpoint: refused before writing
        settings["surrogate_sha256"] = sha256(Path(checkpoint))
        if method == "collapse":
            settings["score_sha256"] = sha256(Path(noise.generator.hparams.score_checkpoint))
    _claim_output(output_dir, settings)
    if checkpoint is None:
        checkpoint = str(output_dir / QUICK_CHECKPOINT)
        score_checkpoint = str(output_dir / QUICK_SCORE_CHECKPOINT) if method == "collapse" else None
        if not Path(checkpoint).is_file():
            fit_quick_surrogate(jobs, classes, Path(checkpoint), mode=MODES[method], epsilon=epsilon, seed=seed,
                                device=run, score_checkpoint=score_checkpoint and Path(score_checkpoint))
        noise = NOISE_MAKERS[method](checkpoint, classes, dict(settings, score_checkpoint=score_checkpoint), run)
    notes = []
    if len(classes) > noise.num_classes:
        notes.append(f"{len(classes)} classes but the generator has {noise.num_classes}: classes share labels "
                     "(class i gets label i mod K), which weakens their protection")
    picks = set(np.linspace(0, len(jobs) - 1, min(grid_images, len(jobs))).round().astype(int).tolist())
    batches = SizeBatches(noise, InputRecords(output_dir / RECORD_FILE), batch_size, settings["working_size"])
    entries: dict[int, dict[str, Any]] = {}
    samples: dict[int, tuple[Tensor, Tensor]] = {}
    with tqdm(total=len(jobs), desc="protecting", unit="img", file=sys.stderr) as bar:
        def finish(done: list[Done]) -> None:
            for i, entry, sample in done:
                entries[i] = entry
                if sample is not None and i in picks:
                    samples[i] = sample
            bar.update(len(done))

        for i, job in enumerate(jobs):
            finish(batches.add(i, job, max_pixels))
        finish(batches.flush_all())
    images = [entries[i] for i in sorted(entries) if "reason" not in entries[i]]
    skipped += [entries[i] for i in sorted(entries) if "reason" in entries[i]]
    report = {"settings": settings, "surrogate": shown(checkpoint), "input": shown(input_dir), "notes": notes,
              "images": images, "skipped": skipped}
    grid = [samples[i] for i in sorted(samples)]
    write_report(output_dir, report, grid, epsilon)
    done = sum(e["status"] == "protected" for e in images)
    print(f"{len(images)} images protected in {shown(output_dir)} ({done} in this run), {len(skipped)} left out: "
          f"see {shown(output_dir / 'report.md')}", flush=True)
    if verify:
        protected_jobs = [jobs[i] for i in sorted(entries) if "reason" not in entries[i]]
        report["verify"] = verify_protection(
            protected_jobs, output_dir, classes, share=verify_share, platforms=tuple(verify_platforms), seed=seed,
            victim=VictimSettings(size=verify_size, epochs=verify_epochs))
        write_report(output_dir, report, grid, epsilon)
        print(f"verified: {shown(output_dir / 'report.md')}, section 'Does a model learn these photos?'")
    return report
