"""The ``ue`` command: LightningCLI (fit/validate/test/predict) plus ``export``, ``import``, ``pipeline``, ``protect``,
``grid`` and ``embed``.

Examples::

    ue fit --config configs/data/cifar10.yaml --config configs/victim/resnet18.yaml
    ue test --config configs/data/cifar10.yaml --config configs/victim/resnet18.yaml --ckpt_path last.ckpt
    ue predict --config configs/data/cifar10.yaml --config configs/generator/rem.yaml --ckpt_path generator.ckpt
    ue export --noise noise.safetensors --dataset cifar10 --root data --output protected/ --format png
    ue import --source perturbation.pt --format em --dataset cifar10 --root data --output em.safetensors
    ue protect --input my-photos/ --output my-photos-protected/
"""

from __future__ import annotations

import os
import sys

from ue_lightning.lightning_cli import UECLI, build_cli  # noqa: F401  (re-exported: tests and callers use ue_lightning.cli)

TRAINER_COMMANDS = ("fit", "validate", "test", "predict")  # LightningCLI's subcommands
EXTRA_COMMANDS = ("export", "import", "pipeline", "protect", "grid", "embed")

TOP_HELP = """usage: ue COMMAND [options]    (ue COMMAND --help: that command's options)

Make image datasets unlearnable, and measure how well the protection holds.

commands:
  fit        train a model from YAML configs: a score estimator, a noise generator or a victim
  validate   evaluate a model on the validation split
  test       evaluate a model (e.g. a victim from its checkpoint) on the clean test split
  predict    write a fitted generator's noise over the train split to a noise file
  export     apply a noise file to a dataset and write the protected images (png, CIFAR batches or APBench's
             folder), or write the noise for the authors' code (--format em: EM's .pt, rem: REM's .pkl)
  import     read the authors' released noise (EM's perturbation.pt, REM's .pkl) or an APBench poisoned
             dataset (a folder of <index>.png) into a noise file
  pipeline   score estimator -> generators -> noise files -> victims -> accuracy table, in one go
  protect    protect a folder of your own images: lossless PNGs at their own size, and a report
  grid       run a YAML grid of cells (the papers' tables) resumably, here or on SLURM, and render it
  embed      draw a victim's features of clean and protected train images on one t-SNE map (Fig. 2)

examples:
  ue pipeline                                        # everything on the embedded digits, ~3 min
  ue protect --input my-photos/ --output my-photos-protected/   # + report.md, grid.png
  ue fit --config configs/data/cifar10.yaml --config configs/generator/em-samplewise.yaml
  ue predict --config configs/data/cifar10.yaml --config configs/generator/em-samplewise.yaml \\
      --ckpt_path runs/generator/em-samplewise-cifar10/checkpoints/last.ckpt
  ue fit --config configs/data/cifar10.yaml --config configs/victim/resnet18.yaml \\
      --data.perturbation runs/noise/em-samplewise-cifar10.safetensors
"""


#: Errors that mean "the input is wrong" (a bad value, a foreign or damaged file, a missing path): ``ue``
#: prints their message alone, on one line, and exits with 2; ``UE_DEBUG=1`` shows the traceback instead.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, KeyError, PermissionError)


def main(argv: list[str] | None = None) -> None:
    try:
        _run(argv)
    except BrokenPipeError:  # `ue grid status ... | head`: the reader has gone, nothing is wrong
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        sys.exit(0)
    except USER_ERRORS as error:
        if os.environ.get("UE_DEBUG"):
            raise
        print(f"ue: error: {_root_message(error)}", file=sys.stderr)
        sys.exit(2)


def _root_message(error: BaseException) -> str:
    """The message of the innermost user error in the chain: jsonargparse wraps the package's
    own message (e.g. "epsilon=100 is out of range ...") in a long list of union subtypes."""
    root, cause = error, _cause(error)
    while cause is not None:
        if isinstance(cause, USER_ERRORS):
            root = cause
        cause = _cause(cause)
    return str(root.args[0]) if isinstance(root, KeyError) and root.args else str(root)


def _cause(error: BaseException) -> BaseException | None:
    """The error ``error`` was raised from or while handling, unless raised ``from None`` (its own message says it)."""
    return error.__cause__ or (None if error.__suppress_context__ else error.__context__)


def _run(argv: list[str] | None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(TOP_HELP, end="")
        return
    if args[0] == "grid":
        from ue_lightning.grid import main as grid_main

        return grid_main(args[1:])
    if args[0] in EXTRA_COMMANDS:
        from jsonargparse import CLI

        from ue_lightning.console import OneLineParser

        if args[0] == "export":
            from ue_lightning.data.export import export_protected as command
        elif args[0] == "import":
            from ue_lightning.data.authors_noise import import_noise as command
        elif args[0] == "protect":
            from ue_lightning.protect.command import protect_folder as command
        elif args[0] == "embed":
            from ue_lightning.embed import embed_features as command
        else:
            from ue_lightning.pipeline import run_pipeline as command
        CLI(command, args=args[1:], as_positional=False, parser_class=OneLineParser, prog=f"ue {args[0]}")
        return
    if not args[0].startswith("-") and args[0] not in TRAINER_COMMANDS:
        print(f"ue: error: unknown command {args[0]!r}: choose one of "
              f"{', '.join(TRAINER_COMMANDS + EXTRA_COMMANDS)} (`ue --help` says what each does)", file=sys.stderr)
        sys.exit(2)
    build_cli(argv)  # None: LightningCLI reads sys.argv itself
    _close_process_group()


def _close_process_group() -> None:
    """Tear down a DDP process group before the interpreter exits.

    Lightning leaves it open after ``test``/``predict``; gloo's threads dying at interpreter
    exit then abort the process ("terminate called without an active exception") after the
    work is done, turning a good run into a failed exit code.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
