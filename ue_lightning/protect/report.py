"""What ``ue protect`` did, beside its output: ``report.json``, ``report.md`` and ``grid.png``.

Per image: max |delta| (1/255 units), PSNR (dB) and SSIM (of the central 1024 x 1024 of a
larger photo) of the protected colour channels against the clean ones (pixels in [0, 1]; alpha
is never changed), computed from the files as written. Overall: the same, summarised, and every file left out with its reason.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from torch import Tensor

from ue_lightning.pictures import perturbation_grid, titled
from ue_lightning.protect.verify import markdown as verify_markdown
from ue_lightning.scratch import atomic_write_bytes, atomic_write_json

REPORT_FILES = ("report.json", "report.md", "grid.png")
def summary(images: list[dict[str, Any]]) -> dict[str, Any]:
    """Overall figures of the per-image entries (None where no image has the figure)."""
    def values(key: str) -> list[float]:
        return [e[key] for e in images if e.get(key) is not None]

    def stat(fn, key: str):
        found = values(key)
        return round(fn(found), 4) if found else None

    return {
        "images": len(images),
        "protected_now": sum(e["status"] == "protected" for e in images),
        "done_before": sum(e["status"] == "done before" for e in images),
        "max_abs_delta": max(values("max_abs_delta"), default=None),
        "psnr_db_mean": stat(lambda v: sum(v) / len(v), "psnr_db"),
        "psnr_db_min": stat(min, "psnr_db"),
        "ssim_mean": stat(lambda v: sum(v) / len(v), "ssim"),
        "ssim_min": stat(min, "ssim"),
    }


def _cell(value: Any, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _steps(settings: dict[str, Any]) -> str:
    """How the noise was made, in a few words."""
    method = settings["method"]
    if method == "em":
        views = " on alternate steps" if settings.get("eot_views") == "alternate" else ""
        jpeg = f", through JPEG {settings['eot_jpeg']} too{views}" if settings.get("eot_jpeg") else ""
        return f"{settings['steps']} PGD steps{jpeg}"
    if method == "em-classwise":
        return "one pattern a class"
    score = " and a score step each" if method == "collapse" else ""
    return f"its generator's own noise steps{score}"


def markdown(report: dict[str, Any]) -> str:
    """The short human-readable form of ``report``."""
    s, settings = report["summary"], report["settings"]
    lines = [
        "# ue protect report", "",
        f"{s['images']} images protected ({s['protected_now']} in this run, {s['done_before']} before), "
        f"{len(report['skipped'])} left out; method {settings['method']}, epsilon {settings['epsilon']}/255, "
        f"{_steps(settings)}; surrogate {report['surrogate']}.", "",
        "| | max abs delta (1/255) | PSNR (dB) | SSIM |", "|---|---|---|---|",
        f"| mean | - | {_cell(s['psnr_db_mean'])} | {_cell(s['ssim_mean'], 4)} |",
        f"| worst | {_cell(s['max_abs_delta'])} | {_cell(s['psnr_db_min'])} | {_cell(s['ssim_min'], 4)} |", "",
        "![clean | noise | protected](grid.png)", "",
    ]
    if report["skipped"]:
        lines += ["## Left out", ""] + [f"- `{e['path']}`: {e['reason']}" for e in report["skipped"]] + [""]
    if "verify" in report:
        lines += verify_markdown(report["verify"])
    lines += ["Per image: report.json."]
    return "\n".join(lines) + "\n"


def write_report(output_dir: Path, report: dict[str, Any], grid_samples: list[tuple[Tensor, Tensor]],
                 epsilon: float) -> None:
    """Write ``report.json``, ``report.md`` and (when there are samples) ``grid.png`` into ``output_dir``.

    ``grid_samples``: ``(clean uint8 (C, H, W), int8 delta (C, H, W))`` pairs, colour channels only.
    """
    report = {**report, "summary": summary(report["images"])}
    atomic_write_json(output_dir / "report.json", report)
    atomic_write_bytes(output_dir / "report.md", markdown(report).encode())
    if grid_samples:
        grid = perturbation_grid([c for c, _ in grid_samples], [d for _, d in grid_samples], epsilon)
        png = io.BytesIO()
        titled(grid, epsilon).save(png, format="PNG")
        atomic_write_bytes(output_dir / "grid.png", png.getvalue())
