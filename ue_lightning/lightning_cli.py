"""LightningCLI for ``ue fit|validate|test|predict``: models read their data facts from the DataModule."""

from __future__ import annotations

import importlib
import json
import os
import sys
from pathlib import Path
from types import MethodType
from typing import Any
from unittest.mock import patch

import lightning as L
import torch
from jsonargparse import ArgumentParser, Namespace
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.model_helpers import is_overridden

from ue_lightning.compose import fill_placeholders, missing_overlays, run_names, unnamed_error
from ue_lightning.console import OneLineErrors, TransientProgressBar, import_class, quiet_third_party
from ue_lightning.data.datamodule import UEDataModule
from ue_lightning.models.checkpoint import check_fits, load_checkpoint_file, refuse_url
from ue_lightning.modules.noise_store import stream_checkpoints


#: How to get a checkpoint ``ue`` accepts, ending every refusal of a ``--ckpt_path``.
TRUSTED_CHECKPOINT = "pass a checkpoint that ue fit wrote, from a source you trust"

#: Model arguments the CLI links from the DataModule (never set in configs).
LINKED_FROM_DATA = ("num_classes", "in_channels", "image_size")


class UEArgumentParser(OneLineErrors, LightningArgumentParser):
    """Lightning's parser, refusing a command line in one ``ue: error:`` line (the usage only with ``--help``)."""


class UECLI(LightningCLI):
    """LightningCLI whose models read their data facts (classes, channels, size) from the DataModule."""

    def add_arguments_to_parser(self, parser) -> None:
        for attr in LINKED_FROM_DATA:
            parser.link_arguments(f"data.{attr}", f"model.init_args.{attr}", apply_on="instantiate")
        parser.add_argument("--start_over", type=bool, default=False,
                            help="ue fit: start over although the checkpoint folder holds a previous run's last.ckpt "
                                 "(overwritten; without it ue fit refuses and says how to resume)")

    def predict(self, **kwargs) -> None:
        """``ue predict``: writer callbacks save the output (e.g. PerturbationWriter), so the CLI keeps no
        predictions in memory (Lightning's default would hold a whole noise file, 25 GB for the ImageNet subset)."""
        self.trainer.predict(**{**kwargs, "return_predictions": False})

    def _parse_ckpt_path(self) -> None:
        """Lightning replaces the model's settings by the checkpoint's when ``--ckpt_path`` is given.

        Refuse a checkpoint of another module class (it would silently replace the module and
        fail later with an unrelated error) and one whose weights do not fit the module its
        hyperparameters describe (checked on the meta device, before Lightning builds it), and say
        which settings from the config or the command line the checkpoint overrides, with both values.
        """
        subcommand = self.config.get("subcommand")
        before = self.config[subcommand].get("model") if subcommand else None
        ckpt = self.config[subcommand].get("ckpt_path") if subcommand else None
        checkpoint = None  # read by the package's loader first: Lightning's own read of a file that would run
        if isinstance(ckpt, (str, Path)) and Path(ckpt).is_file():  # code raises torch's advice (weights_only=False)
            checkpoint = load_checkpoint_file(ckpt, name="--ckpt_path", mmap=True, fix=TRUSTED_CHECKPOINT)
        super()._parse_ckpt_path()
        after = self.config[subcommand].get("model") if subcommand else None
        if before is None or after is None or before is after:
            return
        if before.class_path != after.class_path:
            raise ValueError(f"--ckpt_path {ckpt} holds a {after.class_path.rsplit('.', 1)[-1]}, but the config's model "
                             f"is a {before.class_path.rsplit('.', 1)[-1]}: pass a checkpoint of that model, or the "
                             "config the checkpoint was made with")
        refuse_unfit_weights(after, checkpoint, f"--ckpt_path {ckpt}")
        mine, theirs = vars(before.init_args), vars(after.init_args)
        changed = [f"{k}: {mine[k]!r} (config) -> {theirs[k]!r} (checkpoint)" for k in mine
                   if k not in LINKED_FROM_DATA and k in theirs and theirs[k] != mine[k]]
        if changed:
            rank_zero_warn(f"--ckpt_path {ckpt} brings its own model settings, and they are the ones used: "
                           + "; ".join(changed))

    def parse_arguments(self, parser, args) -> None:
        """Given ``args`` are the whole command line: ``sys.argv`` then belongs to the caller (``ue pipeline``'s
        own, pytest's, a notebook kernel's), and Lightning would warn that both were given."""
        with patch.object(sys, "argv", sys.argv[:1] if args is not None else sys.argv):
            super().parse_arguments(parser, args)
        config = self.config[self.config["subcommand"]] if self.config.get("subcommand") else self.config
        fill_run_names(config)

    def before_instantiate_classes(self) -> None:
        if self.subcommand is not None:
            refuse_remote_checkpoint(self.config[self.subcommand].get("ckpt_path"))
        if self.subcommand == "fit":
            refuse_silent_restart(self.config.fit)

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        if not is_overridden("validation_step", self.model):
            # The DataModule offers the clean test split as validation data; a model without a validation step
            # (every generator) has no use for it, and Lightning would say so at every fit ("You passed in a
            # `val_dataloader` but have no `validation_step`"). This DataModule then offers none.
            self.datamodule.val_dataloader = MethodType(L.LightningDataModule.val_dataloader, self.datamodule)

    def instantiate_trainer(self, **kwargs):
        """The trainer; its default logger (``logger`` unset or true) writes TensorBoard and CSV, side by side, and
        its checkpoints are read by the package's own loader (:class:`~ue_lightning.modules.noise_store.StreamingCheckpointIO`)."""
        config = self._get(self.config_init, "trainer", default={})
        if "logger" not in kwargs and config.get("logger") in (None, True):
            kwargs["logger"] = default_loggers(config.get("default_root_dir") or os.getcwd())
        trainer = super().instantiate_trainer(**kwargs)
        stream_checkpoints(trainer)  # --ckpt_path is read by the package's loader: local files, weights_only
        return trainer


def fill_run_names(config) -> None:
    """Fill ``{data}`` and ``{method}`` in the parsed settings from the ``--config`` file names
    (``ue_lightning.compose``), and warn when a method's overlay for the data exists but was not given."""
    configs = config.get("config") or []
    for overlay in missing_overlays(configs):
        rank_zero_warn(f"{overlay} holds this method's settings for this data, and was not given: the method "
                       f"config's own settings are used (add --config {overlay} for the shipped ones)")
    names, missing = run_names(configs), []
    for key in ("model", "data", "trainer"):
        if key in config:
            config[key] = fill_placeholders(config[key], names, key, missing)
    if missing:
        raise unnamed_error(missing)


def default_loggers(root: str) -> list:
    """CSV and TensorBoard loggers writing into one folder, ``<root>/lightning_logs/version_<n>``.

    Lightning's default is TensorBoard alone; the CSV file (``metrics.csv``) is for scripts and for reading
    without TensorBoard. The version is fixed once so that both loggers use the same folder (each would
    otherwise pick the next free number itself, and the second would see the first's folder).
    """
    tensorboard = TensorBoardLogger(root, name="lightning_logs", version=SLURMEnvironment.job_id())
    # CSV first: it creates the folder (it warns when it finds one with files in it); TensorBoard adds its own.
    return [CSVLogger(root, name="lightning_logs", version=tensorboard.version), tensorboard]


def refuse_unfit_weights(model: Namespace, checkpoint: Any, name: str) -> None:
    """Refuse (:class:`~ue_lightning.models.checkpoint.CheckpointError`) a checkpoint whose weights are not those of
    ``model``, the module its hyperparameters describe, built first on the meta device (no memory): Lightning
    builds that module for real before it reads any weight, and a 2 KB file could ask for a 14 GB network."""
    state = checkpoint.get("state_dict") if isinstance(checkpoint, dict) else None
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(L.LightningModule, "model")
    with torch.device("meta"):
        skeleton = parser.instantiate_classes(Namespace(model=model)).model
    check_fits(skeleton, state if isinstance(state, dict) else {}, name=name, fix=TRUSTED_CHECKPOINT,
               what=f"a {model.class_path.rsplit('.', 1)[-1]}")


def refuse_silent_restart(config: Namespace) -> None:
    """Refuse (``FileExistsError``) a ``ue fit`` without ``--ckpt_path`` whose checkpoint folder holds a previous
    run's ``last.ckpt`` (e.g. stopped by Ctrl-C): it would start over and overwrite it. The message gives the
    option that resumes it and the one that starts over (``--start_over true``)."""
    if config.get("ckpt_path") is not None or config.get("start_over"):
        return
    for callback in config.get("trainer.callbacks") or []:
        cls = import_class(getattr(callback, "class_path", None))
        settings = getattr(callback, "init_args", None) or Namespace()
        if not (cls is not None and issubclass(cls, ModelCheckpoint) and settings.get("save_last")
                and settings.get("dirpath")):
            continue
        last = Path(settings.dirpath).expanduser() / f"{cls.CHECKPOINT_NAME_LAST}{cls.FILE_EXTENSION}"
        if last.is_file():
            raise FileExistsError(f"{last} holds a previous run of this fit: resume it with --ckpt_path {last}, "
                                  "or start over, overwriting it, with --start_over true")


def refuse_remote_checkpoint(ckpt_path: str | None) -> None:
    """Refuse a ``--ckpt_path`` URL before anything is downloaded (a local one is read by
    :func:`~ue_lightning.models.checkpoint.load_checkpoint_file`, whatever its name starts with)."""
    refuse_url(ckpt_path, "--ckpt_path")


def _import_modules() -> None:
    """Import every LightningModule so configs may name them by class name."""
    importlib.import_module("ue_lightning.modules")


def build_cli(args: list[str] | None = None, run: bool = True) -> UECLI:
    """The LightningCLI behind ``ue fit|validate|test|predict`` (``args`` as on the command line)."""
    _import_modules()
    quiet_third_party()
    return UECLI(
        L.LightningModule,
        UEDataModule,
        subclass_mode_model=True,
        seed_everything_default=0,
        trainer_defaults={
            "inference_mode": False,  # attacks need input gradients in test/predict
            # Lightning's 50 is longer than an epoch of the package's small runs (the digits: 11-22 batches,
            # 5000-image subsets: 20-40), which then log nothing within an epoch and warn at every fit.
            "log_every_n_steps": 10,
        },
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
        parser_class=UEArgumentParser,
        parser_kwargs={"prog": "ue"},
        args=args,
        run=run,
    )


def check_config(path: str) -> str:
    """``path``, once it is known to be a file (else a one-line error naming the fix)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"config {path} not found: run `ue pipeline` from the repository root "
                                "(configs/ lives there) or pass the config paths explicitly")
    return path


def stage_cli(config: str | list[str], root: Path, *overrides: str, progress: bool | None = None):
    """The LightningCLI of one stage (not run): ``config`` (one path, or several merged in order) plus
    ``overrides``, writing only below ``root``, logging to CSV (``root/logs``), no checkpoints; a progress bar
    if ``progress`` (None: on a terminal). The notebook uses it too."""
    # The configs' callbacks write checkpoints and noise files to their own runs/ folders; the pipeline keeps
    # its models in memory and writes everything it keeps below its workdir instead. Lightning's bars are
    # shown on a terminal only, and cleared after each loop: the stage lines are the pipeline's record.
    terminal = sys.stdout.isatty() if progress is None else progress
    callbacks = [{"class_path": f"{TransientProgressBar.__module__}.TransientProgressBar"}] if terminal else []
    configs = [config] if isinstance(config, str) else list(config)
    args = [*(a for c in configs for a in ("--config", check_config(c))), "--trainer.default_root_dir", str(root),
            "--trainer.callbacks", json.dumps(callbacks), "--trainer.enable_checkpointing", "false",
            "--trainer.logger", json.dumps({"class_path": "lightning.pytorch.loggers.CSVLogger",
                                            "init_args": {"save_dir": str(root), "name": "logs"}}),
            "--trainer.enable_progress_bar", json.dumps(terminal), "--trainer.enable_model_summary", "false",
            *overrides]
    return build_cli(args, run=False)
