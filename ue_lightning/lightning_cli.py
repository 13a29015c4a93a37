"""LightningCLI for ``ue fit|validate|test|predict``: models read their data facts from the DataModule."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.cli import LightningCLI

from ue_lightning.data import UEDataModule


class UECLI(LightningCLI):
    """LightningCLI whose models read their data facts (classes, channels, size) from the DataModule."""

    def add_arguments_to_parser(self, parser) -> None:
        for attr in ("num_classes", "in_channels", "image_size"):
            parser.link_arguments(f"data.{attr}", f"model.init_args.{attr}", apply_on="instantiate")

    def predict(self, **kwargs) -> None:
        """``ue predict``: writer callbacks save the output (e.g. PerturbationWriter), so the CLI keeps no
        predictions in memory (Lightning's default would hold a whole noise file, 25 GB for the ImageNet subset)."""
        self.trainer.predict(**{**kwargs, "return_predictions": False})

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
