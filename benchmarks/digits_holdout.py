"""Choose the digits generator settings on held-out train digits, never looking at the test set.

    python benchmarks/digits_holdout.py --method rem --tag rem-20steps --seeds 0,1,2 -- --trainer.max_steps 20

Fits one of the pipeline's generators on the embedded digits (its configs composed as ``ue pipeline``
composes them, plus the ``ue fit`` options after ``--``), writes its noise file, then trains the pipeline's
victim (``configs/victim/digits.yaml``) on 1150 of the 1347 protected train digits and scores it on the other
197 train digits, clean: ``data.val_fraction 197/1347`` (stratified, ``data.seed 0``; the same split as
``data.train_subset 1150`` and its complement) and ``val/acc``. The test split is never read. Each method and tag
is its own folder (a tag used twice is refused: two runs would share a noise file). Prints and
appends one JSON line per victim (method, tag, options, the surrogate's last logged train-side accuracies
and its accuracy per pass over the data, the victim's radius, train and held-out accuracy) to
``benchmarks/out/digits-holdout/results.jsonl``.

``--adv-radii 0,16,32`` trains one victim per radius and seed: PGD adversarial training at rho_a (1/255
units; 0 is standard training) with ``--adv-steps`` steps of rho_a/4 from a random start. Its ``train_acc``
is then the accuracy on its own adversarial batches (what it fits), and ``held_out_acc`` clean accuracy.
Thread count: the caller's (``OMP_NUM_THREADS``; the pipeline's default is 2).

``--train-digits N`` (a scaling curve): the defender has only a seeded, class-stratified N of the 1347 train
digits (``data.train_subset N``, ``data.seed 0``): the score estimator, the generator and the victim see those
alone, and the victim holds out the same share of them (``round(N * 197/1347)``) as its clean held-out digits.
Give the generator's budget in passes yourself (e.g. ``-- --trainer.max_steps 10`` for 337 digits: the digits
configs' 40 steps of 64 are two passes over 1347), and the victims' ``--victim-epochs`` (the victim config's 15
epochs over 1150 digits are as many SGD steps as 60 over 288).
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import statistics
import sys
import time
from pathlib import Path

from ue_lightning.callbacks import PerturbationWriter
from ue_lightning.compose import compose
from ue_lightning.console import lightning_info_off
from ue_lightning.lightning_cli import stage_cli
from ue_lightning.pipeline import GENERATORS, config_list, uses_score_model

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "out" / "digits-holdout"
DATA = str(REPO / "configs/data/digits.yaml")
VICTIM = str(REPO / "configs/victim/digits.yaml")
SCORE = str(REPO / "configs/score/dsm.yaml")
TRAIN_DIGITS, HELD_OUT = 1347, 197  # the embedded digits' train split, and the share held out of it


def subset_options(train_digits: int) -> list[str]:
    """``ue fit`` options that give every stage only ``train_digits`` of the train digits (none for all of them)."""
    if not 0 < train_digits <= TRAIN_DIGITS:
        raise SystemExit(f"digits_holdout: --train-digits {train_digits} must be in 1..{TRAIN_DIGITS}")
    return [] if train_digits == TRAIN_DIGITS else ["--data.train_subset", str(train_digits), "--data.seed", "0"]


def score_checkpoint(train_digits: int = TRAIN_DIGITS) -> Path:
    """The digits score estimator on ``train_digits`` of the train digits (fitted once, as the pipeline fits it)."""
    name = "score" if train_digits == TRAIN_DIGITS else f"score-{train_digits}"
    path = OUT / f"{name}.ckpt"
    if not path.exists():
        cli = stage_cli(compose(DATA, SCORE), OUT / name, *subset_options(train_digits))
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        cli.trainer.save_checkpoint(path, weights_only=True)
    return path


def generate(method: str, tag: str, overrides: list[str], reuse: bool = False,
             train_digits: int = TRAIN_DIGITS) -> tuple[Path, dict[str, float]]:
    """Fit the generator and write its noise file; returns the file and the surrogate's last train metrics.
    ``reuse``: a finished run of this method and tag gives its noise file and per-pass accuracies instead."""
    folder = OUT / "generator" / method / tag
    output = OUT / "noise" / method / f"{tag}.safetensors"
    if reuse:
        if not output.exists():
            raise SystemExit(f"digits_holdout: --reuse: no noise file {output}: run once without --reuse")
        return output, per_pass(folder / "logs" / "version_0" / "metrics.csv")
    configs = compose(DATA, *(str(REPO / c) for c in config_list(GENERATORS[method])))
    extra = subset_options(train_digits)
    if uses_score_model(configs):
        extra += ["--model.init_args.score_checkpoint", str(score_checkpoint(train_digits))]
    try:  # atomic: two runs given the same method and tag would write (and read) the same noise file
        folder.mkdir(parents=True)
    except FileExistsError:
        raise SystemExit(f"digits_holdout: {folder} exists: choose another --tag, --reuse its noise, "
                         "or delete it to rerun") from None
    cli = stage_cli(configs, folder, *extra, *overrides)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    metrics = {k: round(float(v), 4) for k, v in cli.trainer.callback_metrics.items() if k.startswith("train/")}
    metrics.update(per_pass(Path(cli.trainer.logger.log_dir) / "metrics.csv"))
    cli.trainer.callbacks.append(PerturbationWriter(str(output)))
    cli.trainer.predict(cli.model, datamodule=cli.datamodule, return_predictions=False)
    return output, metrics


def per_pass(metrics_csv: Path) -> dict[str, list[float]]:
    """The surrogate's train-mode accuracy on its own (perturbed, adversarial) batches, and its eval-mode
    accuracy on the clean batches, averaged over each pass (epoch) of the data: ``{"acc_per_pass": [...],
    "clean_acc_per_pass": [...]}`` (empty for generators that log no epochs)."""
    if not metrics_csv.exists():
        return {}
    with open(metrics_csv) as f:
        rows = list(csv.DictReader(f))
    out = {}
    for key, name in (("train/acc_epoch", "acc_per_pass"), ("train/clean_acc_epoch", "clean_acc_per_pass")):
        values = [round(float(r[key]), 3) for r in rows if r.get(key)]
        if values:
            out[name] = values
    return out


def held_out_victim(noise: Path | None, seed: int, tag: str, adv_radius: float = 0.0,
                    adv_steps: int = 5, train_digits: int = TRAIN_DIGITS,
                    epochs: int | None = None) -> dict[str, float]:
    """The pipeline's victim on 1150 protected train digits, scored on the other 197 clean train digits (of
    ``train_digits``: the same shares of them); adversarially trained at ``adv_radius`` (1/255 units) with
    ``adv_steps`` PGD steps of a quarter of it; ``epochs``: the victim's (None: its config's)."""
    extra = ["--data.val_fraction", repr(HELD_OUT / TRAIN_DIGITS), "--data.seed", "0", "--seed_everything", str(seed),
             *subset_options(train_digits)]
    if epochs is not None:
        extra += ["--trainer.max_epochs", str(epochs)]
    if adv_radius > 0:
        extra += ["--model.init_args.adv_radius", repr(adv_radius), "--model.init_args.adv_steps", str(adv_steps)]
    if noise is not None:
        extra += ["--data.perturbation", str(noise)]
    cli = stage_cli(VICTIM, OUT / "victim" / f"{tag}-seed{seed}", *extra)
    dm = cli.datamodule
    cli.trainer.fit(cli.model, datamodule=dm)
    expected = round(train_digits * HELD_OUT / TRAIN_DIGITS)
    if len(dm.val_set) != expected:
        raise RuntimeError(f"{len(dm.val_set)} held-out digits, expected {expected}")
    train_acc = float(cli.trainer.callback_metrics["train/acc"])
    held_out = float(cli.trainer.validate(cli.model, datamodule=dm, verbose=False)[0]["val/acc"])
    return {"train_acc": round(train_acc, 4), "held_out_acc": round(held_out, 4)}


def summary(results: Path, stems: list[str] | None) -> str:
    """A markdown table of ``results`` (this script's JSON lines): per setting (the tag less its ``-n<seed>``
    suffix) and victim radius, the victims' train and held-out accuracy, mean +- sample standard deviation
    over the rows (noise seed x victim seed), and the surrogate's accuracy on its own batches in its last pass.
    ``stems``: only these settings, in this order."""
    groups: dict[tuple[str, float], list[dict]] = {}
    for line in results.read_text().splitlines():
        row = json.loads(line)
        stem = re.sub(r"-n\d+$", "", row["tag"])
        if row.get("victim_epochs") is not None:
            stem += f" (victim {row['victim_epochs']} epochs)"
        if stems is None or stem in stems:
            groups.setdefault((stem, float(row.get("adv_radius", 0.0))), []).append(row)

    def spread(values: list[float]) -> str:
        return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}" if len(values) > 1 else f"{values[0]:.1f}"

    order = {s: i for i, s in enumerate(stems or [])}
    lines = ["| setting | victim rho_a | n | train acc % | held-out acc % (each) | surrogate, last pass |",
             "|---|---|---|---|---|---|"]
    for (stem, radius), rows in sorted(groups.items(), key=lambda kv: (order.get(kv[0][0], 0), kv[0])):
        train = [100 * r["train_acc"] for r in rows]
        held = [100 * r["held_out_acc"] for r in rows]
        last = sorted({r["surrogate"]["acc_per_pass"][-1] for r in rows if r["surrogate"].get("acc_per_pass")})
        lines.append(f"| {stem} | {radius:g} | {len(rows)} | {spread(train)} | {spread(held)} "
                     f"({', '.join(f'{h:.1f}' for h in held)}) | {', '.join(f'{a:.2f}' for a in last) or '-'} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--method", choices=["clean", *GENERATORS])
    p.add_argument("--summary", nargs="?", const=str(OUT / "results.jsonl"), metavar="RESULTS",
                   help="print a table of a results file (default: this script's) and exit")
    p.add_argument("--settings", help="with --summary: only these settings (tags less -n<seed>), comma-separated")
    p.add_argument("--tag", help="name of this setting (default: the method)")
    p.add_argument("--seeds", default="0", help="victim seeds, comma-separated")
    p.add_argument("--adv-radii", default="0", help="victims' adversarial-training radii, 1/255 units, comma-separated")
    p.add_argument("--adv-steps", type=int, default=5, help="PGD steps of the victims' adversarial training")
    p.add_argument("--train-digits", type=int, default=TRAIN_DIGITS,
                   help="give every stage only this many of the 1347 train digits (seeded, stratified): a scaling curve")
    p.add_argument("--victim-epochs", type=int, help="the victims' epochs (default: the victim config's)")
    p.add_argument("--reuse", action="store_true",
                   help="train more victims on the noise file an earlier run of this method and tag wrote")
    p.add_argument("overrides", nargs="*", help="ue fit options of the generator (after --)")
    a = p.parse_args()
    if a.summary:
        if not Path(a.summary).is_file():
            raise SystemExit(f"digits_holdout: --summary: no results file {a.summary}: run a setting first, or name one")
        print(summary(Path(a.summary), a.settings.split(",") if a.settings else None))
        return
    if a.method is None:
        p.error("--method is required (or --summary)")
    tag = a.tag or a.method
    start = time.time()
    with lightning_info_off():
        noise, surrogate = (None, {}) if a.method == "clean" else generate(a.method, tag, a.overrides, a.reuse,
                                                                                    a.train_digits)
        minutes = round((time.time() - start) / 60, 2)
        OUT.mkdir(parents=True, exist_ok=True)
        for radius in (float(r) for r in a.adv_radii.split(",")):
            for seed in (int(s) for s in a.seeds.split(",")):
                folder = f"{a.method}/{tag}" + (f"-at{radius:g}" if radius else "") + (
                    f"-e{a.victim_epochs}" if a.victim_epochs else "")
                row = {"method": a.method, "tag": tag, "overrides": a.overrides, "surrogate": surrogate,
                       "train_digits": a.train_digits, "victim_epochs": a.victim_epochs,
                       "generator_minutes": minutes, "seed": seed, "adv_radius": radius,
                       **({"adv_steps": a.adv_steps} if radius else {}),
                       **held_out_victim(noise, seed, folder, radius, a.adv_steps, a.train_digits,
                                         a.victim_epochs)}
                print(json.dumps(row), flush=True)
                with open(OUT / "results.jsonl", "a") as f:
                    f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    sys.exit(main())
