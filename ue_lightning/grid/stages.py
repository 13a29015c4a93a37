"""Run one stage of a grid in this process: the same LightningCLI as ``ue fit|predict|test``.

Each stage resumes: its ``last.ckpt`` (saved at its config's rhythm) restarts a killed fit,
``fit.json`` marks a finished fit, and its result file (a score model's ``fit.json``, a
generator's ``noise.safetensors``, a victim's ``metrics.json``) is written last and
atomically, so a stage is done exactly when that file exists. Under SLURM with several
tasks (DDP), every rank runs this function and rank 0 alone writes.
"""

from __future__ import annotations

import json
import os
import sys
import time
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Iterator

from ue_lightning.grid.spec import Stage
from ue_lightning.scratch import atomic_write_json


@contextmanager
def output_to(log: Path) -> Iterator[None]:
    """Send this process's stdout and stderr (file descriptors and Python's streams) to ``log`` for the duration."""
    log.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(log, "a") as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        try:
            with redirect_stdout(f), redirect_stderr(f):  # Python's own streams may not be fds 1 and 2
                yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def write_json(path: Path, data: dict) -> None:
    """Atomically (temporary sibling, then rename), its folder made first: a killed run never leaves half a result."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, data)


def _trains(model) -> bool:
    """Whether ``fit`` has anything to do (RandomNoise, LSP and TAP only predict)."""
    import lightning as L

    return type(model).training_step is not L.LightningModule.training_step


def _callbacks(stage: Stage) -> str:
    """The stage's own checkpoint (its config's rhythm, in the stage's folder) in place of the config's callbacks."""
    # One file, `last.ckpt`, overwritten at each save (with save_top_k 0 this Lightning saves no periodic last.ckpt),
    # at the end of each train epoch even when validation is rare or never runs.
    settings = {"dirpath": str(stage.checkpoint.parent), "filename": stage.checkpoint.stem, "save_top_k": 1,
                "enable_version_counter": False, "save_on_train_epoch_end": True, **stage.checkpoint_every}
    return json.dumps([{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": settings}])


def build(stage: Stage):
    """The stage's LightningCLI (run=False), built as ``ue pipeline`` builds its stages."""
    from ue_lightning.lightning_cli import stage_cli

    folder = Path(stage.folder)
    more = [a for config in stage.configs[1:] for a in ("--config", config)]
    return stage_cli(stage.configs[0], folder, *more, *stage.args, "--trainer.default_root_dir", str(folder),
                     "--trainer.enable_checkpointing", "true", "--trainer.callbacks", _callbacks(stage))


def run_stage(stage: Stage) -> None:
    """Run ``stage`` unless it is done: fit (resuming), then predict the noise file or score the victim."""
    os.chdir(stage.cwd)  # configs name data and files relative to the repository root
    if stage.done():
        return
    folder = Path(stage.folder)
    folder.mkdir(parents=True, exist_ok=True)
    start = time.time()
    cli = build(stage)
    trainer, model, data = cli.trainer, cli.model, cli.datamodule
    if trainer.is_global_zero:
        (folder / "config.yaml").write_text(cli.parser.dump(cli.config, skip_none=False))
    ckpt = stage.checkpoint
    fit_file = folder / "fit.json"
    trains = _trains(model)
    if trains and not fit_file.exists():
        trainer.fit(model, datamodule=data, ckpt_path=str(ckpt) if ckpt.exists() else None)
        trainer.save_checkpoint(ckpt)  # the final state, whatever the checkpoint rhythm
        fitted = {"train_acc": _metric(trainer, "train/acc"), "minutes": round((time.time() - start) / 60, 2)}
        if trainer.is_global_zero:
            write_json(fit_file, fitted)
        resume = None  # the model in memory is the fitted one
    else:
        resume = str(ckpt) if trains else None
    if stage.kind == "generator":
        from ue_lightning.callbacks import PerturbationWriter

        trainer.callbacks.append(PerturbationWriter(str(stage.result)))
        trainer.predict(model, datamodule=data, return_predictions=False, ckpt_path=resume)
    elif stage.kind == "victim":
        scores = _score(stage, trainer, model, data, resume)
        fitted = json.loads(fit_file.read_text()) if trainer.is_global_zero else {}
        if trainer.is_global_zero:
            import torch

            write_json(stage.result, {
                **stage.cell, "key": stage.key, "train_acc": fitted.get("train_acc"), **scores,
                "fit_minutes": fitted.get("minutes"), "minutes": round((time.time() - start) / 60, 2),
                "threads": torch.get_num_threads(), "checkpoint": str(ckpt)})


def _score(stage: Stage, trainer, model, data, resume: str | None) -> dict[str, float]:
    """The fitted victim's clean accuracy: on the test split (``test_acc``, and any other ``test/`` metric), or in a
    ``held_out:`` grid on its held-out train images (``held_out_acc``: ``data.val_fraction``, clean), the test split
    never read."""
    if stage.scored_on == "held_out":
        validated = trainer.validate(model, datamodule=data, verbose=False, ckpt_path=resume)[0]
        return {"held_out_acc": float(validated["val/acc"])}
    tested = trainer.test(model, datamodule=data, verbose=False, ckpt_path=resume)[0]
    return {"test_acc": float(tested["test/acc"]),
            **{k.replace("/", "_"): float(v) for k, v in tested.items() if k != "test/acc"}}


def _metric(trainer, name: str) -> float | None:
    value = trainer.callback_metrics.get(name)
    return None if value is None else float(value)
