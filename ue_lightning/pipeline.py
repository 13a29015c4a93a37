"""`ue pipeline`: the whole data flow of DESIGN.md in one command, with a table at the end.

score estimator -> noise generators (fit, then predict over the train set into noise
files) -> victims trained on clean and on each protected train set (at each adversarial
radius) -> clean test accuracy table. Each stage is the same LightningCLI that
``ue fit/predict/test`` runs, built from the stage's YAML config.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import yaml

from ue_lightning.callbacks import PerturbationWriter


def _check_config(path: str) -> str:
    if not Path(path).is_file():
        raise FileNotFoundError(f"config {path} not found: run `ue pipeline` from the repository root "
                                "(configs/ lives there) or pass the config paths explicitly")
    return path


def _uses_score_model(config: str) -> bool:
    model = (yaml.safe_load(Path(config).read_text()) or {}).get("model", {})
    return "score_checkpoint" in (model.get("init_args") or {})


def _cli(config: str, root: Path, *overrides: str):
    from ue_lightning.cli import build_cli

    args = ["--config", _check_config(config), "--trainer.default_root_dir", str(root),
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false", *overrides]
    return build_cli(args, run=False)


def _write_json(path: Path, data: dict) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, path)


def run_pipeline(
    score: str | None = "configs/score/digits.yaml",
    generators: dict[str, str] | None = None,
    victim: str = "configs/victim/digits.yaml",
    adv_radii: list[float] | None = None,
    workdir: str = "runs/pipeline/digits",
) -> dict[str, dict[str, float]]:
    """Run score estimator, generators, noise files and victims; print the accuracy table.

    Args:
        score: ScoreEstimator config (None: skip, for generators that need no score model).
        generators: name -> generator config (default: REM and collapse on the embedded digits).
        victim: VictimClassifier config (its data section is the one the victims train on).
        adv_radii: adversarial-training radii of the victims, in 1/255 units (0: standard training).
        workdir: where checkpoints, noise files and ``results.json`` go.

    Returns:
        ``{train data name: {"rho_a=R": clean test accuracy}}``.
    """
    generators = generators if generators is not None else {
        "rem": "configs/generator/rem-digits.yaml", "collapse": "configs/generator/collapse-digits.yaml"}
    adv_radii = adv_radii if adv_radii is not None else [0.0]
    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    for config in [c for c in (score, victim, *generators.values()) if c]:
        _check_config(config)

    score_ckpt = None
    if score and any(_uses_score_model(c) for c in generators.values()):
        print(f"== score estimator ({score})")
        cli = _cli(score, work / "score")
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        score_ckpt = work / "score.ckpt"
        cli.trainer.save_checkpoint(score_ckpt)

    noise_files: dict[str, Path] = {}
    for name, config in generators.items():
        print(f"== generator {name} ({config})")
        extra = ["--model.init_args.score_checkpoint", str(score_ckpt)] if _uses_score_model(config) and score_ckpt else []
        cli = _cli(config, work / "generator" / name, *extra)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        output = work / "noise" / f"{name}.safetensors"
        cli.trainer.callbacks = [c for c in cli.trainer.callbacks if not isinstance(c, PerturbationWriter)]
        cli.trainer.callbacks.append(PerturbationWriter(str(output)))
        cli.trainer.predict(cli.model, datamodule=cli.datamodule, return_predictions=False)
        noise_files[name] = output

    results: dict[str, dict[str, float]] = {}
    for data_name, noise in [("clean", None), *noise_files.items()]:
        for radius in adv_radii:
            print(f"== victim on {data_name} data, rho_a = {radius:g}/255")
            extra = ["--model.init_args.adv_radius", str(radius)]
            if noise is not None:
                extra += ["--data.perturbation", str(noise)]
            cli = _cli(victim, work / "victim" / f"{data_name}-rho{radius:g}", *extra)
            cli.trainer.fit(cli.model, datamodule=cli.datamodule)
            metrics = cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)[0]
            results.setdefault(data_name, {})[f"rho_a={radius:g}"] = float(metrics["test/acc"])
            _write_json(work / "results.json", results)

    print(format_table(results))
    return results


def format_table(results: dict[str, dict[str, float]]) -> str:
    """Markdown table: rows = train data, columns = adversarial radius, cells = clean test accuracy (%)."""
    columns = list(next(iter(results.values())).keys())
    lines = ["| train data | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for name, row in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{100 * row[c]:.1f}" for c in columns) + " |")
    return "clean test accuracy (%) of victims\n" + "\n".join(lines)
