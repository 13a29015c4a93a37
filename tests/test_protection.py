"""Protection that could fail: the README's pipeline (`ue pipeline`, every default generator) on the embedded digits.

Score estimator, EM class-wise, TUE, EM sample-wise, REM and data collapse noise -> noise files -> victims
on clean and on protected digits (16x16, radius 64/255: see docs/digits.md), through
`ue_lightning.pipeline.run_pipeline` with its defaults, two stages at once.

Bounds, chosen to hold on any machine of this kind (issue 30): every protected victim must learn its train
set (train accuracy above 90%: what it learned is on the protected data), and score at least ``DROP[name]``
of clean test accuracy below the clean victim. The float results of every stage depend on the processor
(oneDNN, ATen and MKL pick their kernels by CPU), so one machine's table is one draw of noise and victim;
the bounds come from 3 noise seeds x 3 victim seeds on held-out train digits on two processors' arithmetic,
AVX2 and AVX-512 (benchmarks/RESULTS.md, "The digits over noise seeds" and "Two processors"; clean
97.5-100%), each about 15 points inside the worst draw: class-wise noises worst 27% (bound: 40 points, the
pipeline's "protected"), REM worst 40% (bound 40), EM sample-wise and collapse worst 52 and 53% (bound 30).
It fails if the noise is not applied, is too weak, or is not learned as a shortcut.

The same run's REM and collapse generators (``work/generator/<name>.ckpt``) then protect 50 train digits a
class as a data owner's photo folder (``ue protect --method rem|collapse --checkpoint ...``, 64/255), and
``--verify``'s quick victim must find them protected (25 points or more below its clean twin on held-out clean
photos).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from conftest import REPO
from ue_lightning.data import NoiseFile, UEDataModule
from ue_lightning.pipeline import GENERATORS, run_pipeline
from ue_lightning.protect.command import protect_folder

#: Photos a class in the ue protect test (its victims train on 45 a class and score the other 5).
PER_CLASS = 50
DROP = {"em-classwise": 0.40, "tue": 0.40, "em-samplewise": 0.30, "collapse": 0.30, "rem": 0.40}


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory) -> tuple[Path, dict]:
    """`ue pipeline` as the README runs it (its defaults), in a folder of its own: (that folder, the table)."""
    tmp_path = tmp_path_factory.mktemp("pipeline")
    (tmp_path / "configs").symlink_to(REPO / "configs")
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.chdir(tmp_path)
        return tmp_path, run_pipeline(workdir="work", jobs=2)


def test_pipeline_protects_digits(pipeline_run):
    tmp_path, results = pipeline_run
    clean = results["clean"]["rho_a=0"]
    assert clean["test_acc"] > 0.9 and clean["train_acc"] > 0.9  # the victim learns clean digits
    assert list(results) == ["clean", *GENERATORS]
    for name in GENERATORS:
        protected = results[name]["rho_a=0"]
        assert protected["train_acc"] > 0.9, (name, results)  # ... and the protected ones (the noise)
        assert protected["test_acc"] <= clean["test_acc"] - DROP[name], (name, results)
    assert json.loads((tmp_path / "work" / "results.json").read_text()) == results
    assert sorted(p.name for p in tmp_path.iterdir()) == ["configs", "work"]  # nothing written outside the workdir

    fingerprint = UEDataModule("digits", resize=16).clean_split("train").fingerprint()
    for name in GENERATORS:
        noise = NoiseFile.open(tmp_path / "work" / "noise" / f"{name}.safetensors")
        noise.check_matches(fingerprint)
        assert noise.metadata.method == name and noise.classwise == (name == "em-classwise"), name
        assert 32 < noise.max_abs() <= 64, name  # within four grey levels, and more than two


@pytest.mark.parametrize("method", ["rem", "collapse"])
def test_ue_protect_with_the_pipelines_robust_generators_protects_a_folder_of_digits(pipeline_run, method, tmp_path):
    """Bound: the verdict ``protected`` (at least 25 points below the clean victim) and a protected victim that
    learned its photos (train above 90%). Measured 2026-12-07 on a Zen 5 (AVX-512): REM 20.0% and collapse 10.0%
    against 96.0%; under the Zen 3's arithmetic (AVX2 kernels): REM 10.0% and collapse 16.0% against 94.0% (each
    on 5 held-out digits a class; with all 1347 digits: 17.2 and 18.7 against 99.3, 10.4 and 25.4 against 98.5)."""
    work = pipeline_run[0] / "work"
    photos = tmp_path / "photos"
    train = UEDataModule("digits", resize=16).clean_split("train")
    first = [i for i in range(len(train)) if (train.targets[:i + 1] == train.targets[i]).sum() <= PER_CLASS]
    for i in first:  # the first 50 train digits of each class, as the owner's photos
        label = int(train.targets[i])
        (photos / f"digit{label}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(train.images[i][0].numpy()).save(photos / f"digit{label}" / f"{i:04d}.png")
    report = protect_folder(str(photos), str(tmp_path / "out"), checkpoint=str(work / "generator" / f"{method}.ckpt"),
                            method=method, epsilon=64, device="cpu", verify=True, verify_size=16, verify_epochs=15,
                            verify_platforms=[])
    assert len(report["images"]) == 10 * PER_CLASS and not report["skipped"]
    written = report["verify"]["platforms"]["as written"]
    assert written["clean"]["test_acc"] > 0.9 and written["protected"]["train_acc"] > 0.9, written
    assert written["verdict"] == "protected", written
