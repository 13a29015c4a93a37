"""Choose the digits generator settings on held-out train digits, never looking at the test set.

    python benchmarks/digits_holdout.py --method rem --tag rem-20steps --seeds 0,1,2 -- --trainer.max_steps 20

Fits one of the pipeline's generators on the embedded digits (its configs composed as ``ue pipeline``
composes them, plus the ``ue fit`` options after ``--``), writes its noise file, then trains the pipeline's
victim (``configs/victim/digits.yaml``) on 1150 of the 1347 protected train digits and scores it on the other
197 train digits, clean: ``data.val_fraction 197/1347`` (stratified, ``data.seed 0``; the same split as
``data.train_subset 1150`` and its complement) and ``val/acc``. The test split is never read. Each method and tag
is its own folder (a tag used twice is refused: two runs would share a noise file). Prints and
appends one JSON line per victim (method, tag, options, the surrogate's last logged train-side accuracies,
the victim's train and held-out accuracy) to ``benchmarks/out/digits-holdout/results.jsonl``.
Thread count: the caller's (``OMP_NUM_THREADS``; the pipeline's default is 2).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from ue_lightning.callbacks import PerturbationWriter
from ue_lightning.compose import compose
from ue_lightning.pipeline import GENERATORS, _as_list, _lightning_info_off, _uses_score_model, stage_cli

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "out" / "digits-holdout"
DATA = str(REPO / "configs/data/digits.yaml")
VICTIM = str(REPO / "configs/victim/digits.yaml")
SCORE = str(REPO / "configs/score/dsm.yaml")
TRAIN_DIGITS, HELD_OUT = 1347, 197  # the embedded digits' train split, and the share held out of it


def score_checkpoint() -> Path:
    """The digits score estimator (fitted once, as the pipeline fits it)."""
    path = OUT / "score.ckpt"
    if not path.exists():
        cli = stage_cli(compose(DATA, SCORE), OUT / "score")
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        cli.trainer.save_checkpoint(path, weights_only=True)
    return path


def generate(method: str, tag: str, overrides: list[str]) -> tuple[Path, dict[str, float]]:
    """Fit the generator and write its noise file; returns the file and the surrogate's last train metrics."""
    configs = compose(DATA, *(str(REPO / c) for c in _as_list(GENERATORS[method])))
    extra = ["--model.init_args.score_checkpoint", str(score_checkpoint())] if _uses_score_model(configs) else []
    folder = OUT / "generator" / method / tag
    try:  # atomic: two runs given the same method and tag would write (and read) the same noise file
        folder.mkdir(parents=True)
    except FileExistsError:
        raise SystemExit(f"digits_holdout: {folder} exists: choose another --tag, or delete it to rerun") from None
    output = OUT / "noise" / method / f"{tag}.safetensors"
    cli = stage_cli(configs, folder, *extra, *overrides)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    metrics = {k: round(float(v), 4) for k, v in cli.trainer.callback_metrics.items() if k.startswith("train/")}
    cli.trainer.callbacks.append(PerturbationWriter(str(output)))
    cli.trainer.predict(cli.model, datamodule=cli.datamodule, return_predictions=False)
    return output, metrics


def held_out_victim(noise: Path | None, seed: int, tag: str) -> dict[str, float]:
    """The pipeline's victim on 1150 protected train digits, scored on the other 197 clean train digits."""
    extra = ["--data.val_fraction", repr(HELD_OUT / TRAIN_DIGITS), "--data.seed", "0", "--seed_everything", str(seed)]
    if noise is not None:
        extra += ["--data.perturbation", str(noise)]
    cli = stage_cli(VICTIM, OUT / "victim" / f"{tag}-seed{seed}", *extra)
    dm = cli.datamodule
    cli.trainer.fit(cli.model, datamodule=dm)
    if len(dm.val_set) != HELD_OUT:
        raise RuntimeError(f"{len(dm.val_set)} held-out digits, expected {HELD_OUT}")
    train_acc = float(cli.trainer.callback_metrics["train/acc"])
    held_out = float(cli.trainer.validate(cli.model, datamodule=dm, verbose=False)[0]["val/acc"])
    return {"train_acc": round(train_acc, 4), "held_out_acc": round(held_out, 4)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--method", required=True, choices=["clean", *GENERATORS])
    p.add_argument("--tag", help="name of this setting (default: the method)")
    p.add_argument("--seeds", default="0", help="victim seeds, comma-separated")
    p.add_argument("overrides", nargs="*", help="ue fit options of the generator (after --)")
    a = p.parse_args()
    tag = a.tag or a.method
    start = time.time()
    with _lightning_info_off():
        noise, surrogate = (None, {}) if a.method == "clean" else generate(a.method, tag, a.overrides)
        minutes = round((time.time() - start) / 60, 2)
        OUT.mkdir(parents=True, exist_ok=True)
        for seed in (int(s) for s in a.seeds.split(",")):
            row = {"method": a.method, "tag": tag, "overrides": a.overrides, "surrogate": surrogate,
                   "generator_minutes": minutes, "seed": seed, **held_out_victim(noise, seed, f"{a.method}/{tag}")}
            print(json.dumps(row), flush=True)
            with open(OUT / "results.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    sys.exit(main())
