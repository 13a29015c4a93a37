"""LightningCLI for ``ue fit|validate|test|predict``: models read their data facts from the DataModule."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_warn

from ue_lightning.data import UEDataModule


#: Model arguments the CLI links from the DataModule (never set in configs).
LINKED_FROM_DATA = ("num_classes", "in_channels", "image_size")


class UECLI(LightningCLI):
    """LightningCLI whose models read their data facts (classes, channels, size) from the DataModule."""

    def add_arguments_to_parser(self, parser) -> None:
        for attr in LINKED_FROM_DATA:
            parser.link_arguments(f"data.{attr}", f"model.init_args.{attr}", apply_on="instantiate")

    def predict(self, **kwargs) -> None:
        """``ue predict``: writer callbacks save the output (e.g. PerturbationWriter), so the CLI keeps no
        predictions in memory (Lightning's default would hold a whole noise file, 25 GB for the ImageNet subset)."""
        self.trainer.predict(**{**kwargs, "return_predictions": False})

    def _parse_ckpt_path(self) -> None:
        """Lightning replaces the model's settings by the checkpoint's when ``--ckpt_path`` is given.

        Refuse a checkpoint of another module class (it would silently replace the module and
        fail later with an unrelated error), and say which settings from the config or the
        command line the checkpoint overrides, with both values.
        """
        subcommand = self.config.get("subcommand")
        before = self.config[subcommand].get("model") if subcommand else None
        super()._parse_ckpt_path()
        after = self.config[subcommand].get("model") if subcommand else None
        if before is None or after is None or before is after:
            return
        ckpt = self.config[subcommand].get("ckpt_path")
        if before.class_path != after.class_path:
            raise ValueError(f"--ckpt_path {ckpt} holds a {after.class_path.rsplit('.', 1)[-1]}, but the config's model "
                             f"is a {before.class_path.rsplit('.', 1)[-1]}: pass a checkpoint of that model, or the "
                             "config the checkpoint was made with")
        mine, theirs = vars(before.init_args), vars(after.init_args)
        changed = [f"{k}: {mine[k]!r} (config) -> {theirs[k]!r} (checkpoint)" for k in mine
                   if k not in LINKED_FROM_DATA and k in theirs and theirs[k] != mine[k]]
        if changed:
            rank_zero_warn(f"--ckpt_path {ckpt} brings its own model settings, and they are the ones used: "
                           + "; ".join(changed))

    def before_instantiate_classes(self) -> None:
        if self.subcommand is not None:
            refuse_remote_checkpoint(self.config[self.subcommand].get("ckpt_path"))


def refuse_remote_checkpoint(ckpt_path: str | None) -> None:
    """Refuse a ``--ckpt_path`` URL before anything is downloaded.

    A checkpoint is a pickle: Lightning loads remote ones with ``weights_only=False``,
    which runs whatever code the file holds, and caches them by file name alone. A local
    file is loaded by the same code, so the user decides what to trust by downloading it.
    """
    if isinstance(ckpt_path, str) and "://" in ckpt_path:
        raise ValueError(f"--ckpt_path {ckpt_path} is a URL: a checkpoint is a pickle that can run code when "
                         "loaded, so ue loads local files only; download it from a source you trust and pass "
                         "the local path")


def _import_modules() -> None:
    """Import every LightningModule so configs may name them by class name."""
    import ue_lightning.modules  # noqa: F401


def build_cli(args: list[str] | None = None, run: bool = True) -> UECLI:
    """The LightningCLI behind ``ue fit|validate|test|predict`` (``args`` as on the command line)."""
    _import_modules()
    return UECLI(
        L.LightningModule,
        UEDataModule,
        subclass_mode_model=True,
        seed_everything_default=0,
        trainer_defaults={"inference_mode": False},  # attacks need input gradients in test/predict
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
        args=args,
        run=run,
    )
