"""``ue protect``'s work queue: photos read one by one, put through noise in batches of one size, written as PNGs.

A photo whose PNG an earlier run made from this very input (:class:`InputRecords`) is taken as done; the others
wait in a queue per size until it holds a batch, then get their noise together (each photo's noise is its own:
the surrogate is in eval mode, the loss a sum, the random draws keyed by the photo) and are written one by one,
each PNG atomically and then recorded, so a killed run resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor

from ue_lightning.data.delta import apply_delta
from ue_lightning.protect.images import ImageJob, Photo, UnreadableImage, read_photo, shown, write_png
from ue_lightning.protect.methods import ClasswiseNoise, RobustNoise, SamplewiseNoise
from ue_lightning.protect.noise import working_shape
from ue_lightning.protect.quality import image_quality


def sha256(path: Path) -> str:
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
        return {"input": relative, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": sha256(source)}

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


def existing_output(job: ImageJob, photo: Photo) -> Photo | None:
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


MIN_WORKING_SIZE = 32
MAX_BATCH_PIXELS = 1 << 20  # working pixels a PGD batch holds at most (ResNet-18 at width 16: about 1-2 GB)
MAX_QUEUED_BYTES = 1 << 29  # decoded images waiting for a batch of their size, at most (512 MB)
#: A settled photo: its place in the folder, its report entry, and for the grid (clean uint8 (C, H, W), int8 delta).
Done = tuple[int, dict[str, Any], Optional[tuple[Tensor, Tensor]]]


class SizeBatches:
    """Images waiting for noise, one queue per size; a queue is protected once it holds a batch.

    :meth:`add` reads an image and either settles it at once (left out; or done before, its PNG
    made from this very input: ``records``) or queues it; both return the images settled, each as
    ``(index, report entry, (clean colour uint8 (C, H, W), int8 delta) or None)``.
    """

    def __init__(self, noise: SamplewiseNoise | ClasswiseNoise | RobustNoise, records: InputRecords, batch_size: int,
                 working_size: int | None):
        self.noise, self.records, self.batch_size, self.working_size = noise, records, batch_size, working_size
        self.queues: dict[tuple[int, ...], list[tuple[int, ImageJob, Photo, dict[str, Any]]]] = {}

    def limit(self, shape: tuple[int, ...]) -> int:
        """Images of ``shape`` (C, H, W) in one batch."""
        h, w = working_shape(shape[1], shape[2], self.working_size)
        return max(1, min(self.batch_size, MAX_BATCH_PIXELS // (h * w)))

    def add(self, i: int, job: ImageJob, max_pixels: int) -> list[Done]:
        try:
            record = InputRecords.of(job.source, str(job.relative))
            photo = read_photo(job.source, max_pixels)
        except UnreadableImage as err:
            return [(i, {"path": shown(job.relative), "reason": str(err)}, None)]
        except OSError as err:  # gone, unreadable (permissions), a dangling link
            return [(i, {"path": shown(job.relative),
                         "reason": f"cannot be read ({type(err).__name__}: {err.strerror})"}, None)]
        done = existing_output(job, photo) if self.records.unchanged(record) else None
        if done is not None:
            return [_entry(i, job, photo, done, record, "done before", None)]
        shape = tuple(photo.colour.shape)
        queue = self.queues.setdefault(shape, [])
        queue.append((i, job, photo, record))
        if len(queue) >= self.limit(shape):
            return self.flush(shape)
        if self.queued_bytes() > MAX_QUEUED_BYTES:  # many sizes, none a full batch yet: free the largest
            return self.flush(max(self.queues, key=lambda s: len(self.queues[s]) * s[0] * s[1] * s[2]))
        return []

    def queued_bytes(self) -> int:
        return sum(p.colour.numel() for queue in self.queues.values() for _, _, p, _ in queue)

    def flush_all(self) -> list[Done]:
        return [done for shape in list(self.queues) for done in self.flush(shape)]

    def flush(self, shape: tuple[int, ...]) -> list[Done]:
        """Protect the queue of ``shape`` and write its PNGs."""
        return self._protect_or_split(self.queues.pop(shape, []))

    def _protect_or_split(self, queue: list) -> list[Done]:
        """Protect ``queue`` as one batch; one image at a time if that exceeds memory; an image that alone exceeds
        it is reported, and the others go on."""
        if not queue:
            return []
        try:
            return self._protect(queue)
        except (MemoryError, RuntimeError) as error:
            if not _out_of_memory(error):
                raise
            if len(queue) == 1:
                return self._report_memory(queue[0], error)
            return [done for item in queue for done in self._protect_or_split([item])]

    @staticmethod
    def _report_memory(item: tuple, error: BaseException) -> list[Done]:
        i, job, photo, _ = item
        return [(i, {"path": shown(job.relative), "reason": f"too large for this device's memory ({photo.size}, "
                     f"{type(error).__name__}): lower --max_pixels to leave such images out sooner"}, None)]

    def _protect(self, queue: list[tuple[int, ImageJob, Photo, dict[str, Any]]]) -> list[Done]:
        labels, deltas = self.noise([job for _, job, _, _ in queue], torch.stack([p.colour for _, _, p, _ in queue]),
                                    torch.tensor([i for i, _, _, _ in queue]))
        done = []
        for (i, job, photo, record), label, delta in zip(queue, labels.tolist(), deltas):
            protected = Photo(apply_delta(photo.colour, delta), photo.alpha, photo.note, photo.icc_profile)
            write_png(protected, job.output)
            self.records.add(record)
            done.append(_entry(i, job, photo, protected, record, "protected", label))
        return done


def _out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` says the device ran out of memory (torch's CPU allocator raises a RuntimeError)."""
    return isinstance(error, (MemoryError, torch.OutOfMemoryError)) or "allocate memory" in str(error)


def _entry(i: int, job: ImageJob, photo: Photo, protected: Photo, record: dict[str, Any], status: str,
           label: int | None) -> Done:
    """The report entry of an image and its grid sample ``(clean colour uint8 (C, H, W), int8 delta (C, H, W))``."""
    delta = (protected.colour.to(torch.int16) - photo.colour.to(torch.int16)).to(torch.int8)
    entry = {"input": shown(job.relative), "output": shown(job.relative.with_suffix(".png")),
             "class": None if job.class_name is None else shown(job.class_name),
             "label": label, "size": list(photo.size), "mode": photo.mode, "status": status, "note": photo.note,
             "input_sha256": record["sha256"],
             **image_quality(photo.colour, protected.colour)}
    return i, entry, (photo.colour, delta)
