"""What the package prints besides its results: progress bars, and the third-party lines it silences.

Progress bars are tqdm bars shown only where someone can watch them: on a terminal (tqdm's
``disable=None``: none when the output goes to a file or a pipe, so logs hold no bar updates), and,
inside a Lightning run, only on global rank 0 and when the trainer shows Lightning's tqdm bar; they
then sit on the line below it and are cleared when their loop ends. ``ue pipeline`` turns Lightning's
bars off when its output is not a terminal and uses :class:`TransientProgressBar` when it is.

``UE_DEBUG=1`` shows everything the package would silence (and ``ue``'s tracebacks): see :func:`debugging`.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import inspect
import logging
import os
import re
import sys
import warnings
from contextlib import contextmanager
from typing import Iterable, Iterator, NoReturn

from jsonargparse import ArgumentParser
from lightning.pytorch.callbacks import TQDMProgressBar
from tqdm import tqdm


def debugging() -> bool:
    """``UE_DEBUG`` is set: show tracebacks, third-party warnings and Lightning's INFO lines as they come."""
    return bool(os.environ.get("UE_DEBUG"))


@contextmanager
def lightning_info_off() -> Iterator[None]:
    """Lightning's INFO lines (devices, seed, stop reasons) off while in-process stages run (the benchmarks' scripts,
    ``ue protect``'s quick generators): they would repeat at every stage. Its warnings still show; UE_DEBUG=1 shows
    all."""
    loggers = [] if debugging() else [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def progress(iterable: Iterable | None = None, *, desc: str, total: int | None = None, unit: str = "batch",
             trainer=None) -> tqdm:
    """``iterable`` wrapped in a transient progress bar (or a bar to ``update()`` by hand: ``iterable=None``).

    Args:
        desc: what the bar counts, e.g. ``"EM noise pass 3"``.
        total: the count at the end (None: the length of ``iterable``, if it has one).
        unit: what one step is.
        trainer: the Lightning trainer the loop runs in (a loop inside a fit, test or predict), or None.
            With a trainer the bar goes to stdout, below Lightning's bar (where Lightning writes its own);
            without one, to stderr.
    """
    if trainer is None:
        show, file, position = True, sys.stderr, None
    else:
        bar = trainer.progress_bar_callback
        show = isinstance(bar, TQDMProgressBar) and bar.is_enabled and trainer.is_global_zero
        file, position = sys.stdout, (2 * bar.process_position + 1 if show else None)
    return tqdm(iterable, desc=desc, total=total, unit=unit, leave=False, file=file, position=position,
                disable=None if show else True, dynamic_ncols=True)


class TransientProgressBar(TQDMProgressBar):
    """Lightning's tqdm bars, each cleared when its loop ends (Lightning leaves the train, test and predict
    bars on the screen), so that a run of many stages keeps only its own lines."""

    def init_train_tqdm(self):
        return _transient(super().init_train_tqdm())

    def init_test_tqdm(self):
        return _transient(super().init_test_tqdm())

    def init_predict_tqdm(self):
        return _transient(super().init_predict_tqdm())


def _transient(bar: tqdm) -> tqdm:
    bar.leave = False
    return bar


class _DropLightningTips(logging.Filter):
    """Drops Lightning's advertisements ("💡 Tip: ... try installing litlogger/litmodels"), an INFO line
    printed at every Trainer that does not use Lightning's cloud logger; no setting turns it off."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip:")


def quiet_third_party() -> None:
    """Silence the console lines of third-party code that the package cannot fix where they arise.

    Narrow on purpose: one message each, matched by its text and the module that issues it. Not under UE_DEBUG.
    """
    if debugging():
        return
    # Lightning 2.6's CombinedLoader builds a ``LeafSpec()`` (lightning/pytorch/utilities/_pytree.py), a
    # constructor torch 2.14 deprecates; every fit, validate, test and predict reaches it, whatever the package
    # passes. A Lightning release that builds its treespecs with torch's ``treespec_leaf()`` ends it.
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                            category=FutureWarning, module=r"lightning\.pytorch\.utilities\._pytree")
    # Lightning 2.6's ModelCheckpoint(every_n_train_steps=...) warns, in 14 lines, at the first save of a
    # manually optimised module (EM's configs save every round) unless the module keeps a `saved_models` dict
    # of a `layer` attribute (a Lightning test's convention) to save the weights from before the optimiser
    # step. EM's round checkpoints are meant to hold the state after the step: a resumed run continues there.
    warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization and every_n_train",
                            category=UserWarning, module=r"lightning\.pytorch\.callbacks\.model_checkpoint")
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)  # whichever Lightning imported last logs rank_zero_info's lines
        if not any(isinstance(f, _DropLightningTips) for f in logger.filters):
            logger.addFilter(_DropLightningTips())


class OneLineErrors:
    """A jsonargparse parser mixin: a command line it refuses is one ``ue: error:`` line naming the fix, exit 2.

    jsonargparse prints the whole usage (60 lines for ``ue fit``) before its message, and a nested
    message over many more; the usage stays with ``--help``, jsonargparse's own output with ``UE_DEBUG=1``.
    """

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if debugging() or not self.exit_on_error:  # not exit_on_error: jsonargparse's own tries raise
            super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        print(f"ue: error: {refusal_line(parser, message)}", file=sys.stderr)
        self.exit(2)


def refusal_line(parser, message: str) -> str:
    """jsonargparse's ``message`` for a refused command line as one line naming the fix: the closest option
    to a mistyped one, the type a value should have, the path that does not exist."""
    command = parser.prog.replace(" [options]", "")
    keys = re.findall(r'Parser key "([^"]+)"', message)
    option = "--" + ".init_args.".join(keys)
    if unknown := re.match(r"unrecognized arguments: (\S+)", message):
        typed = unknown[1].split("=")[0]
        known = [name for action in parser._actions for name in action.option_strings]
        kind = "option" if typed.startswith("-") else "argument"
        return f"unknown {kind} {typed}{_closest(typed, known)} (`{command} --help` lists the options)"
    if unknown := re.search(r"Option '([^']+)' is not accepted", message):
        typed, owner = f"{option}.init_args.{unknown[1]}", re.search(r"class_path '([^']+)'", message)
        known = [f"{option}.init_args.{name}" for name in _parameters(owner[1] if owner else "")]
        return f"unknown option {typed}{_closest(typed, known)} (`{command} --help` lists the options)"
    if missing := re.search(r"File does not exist: '([^']+)'", message):
        return f"{option} {missing[1]}: no such file; check the path"
    given = re.search(r"(?:Got value|Given value): (.*)", message)
    if given and "Expected a dot import path string" in message:
        return f"{option} {given[1]}: no such class; give a class name or a full dotted class_path"
    wanted = dict.fromkeys(_type_name(t) for t in re.findall(r"Expected an? (<class '\w+'>|typing\.Literal\[[^\]]*\])",
                                                             message))
    if keys and given and wanted:
        return (f"{option} {given[1]}: expected {' or '.join(wanted)}; give one "
                f"(`{command} --help` lists each option's type)")
    return f"{' '.join(message.split())} (`{command} --help` lists the options)"


def _closest(typed: str, known: list[str]) -> str:
    match = difflib.get_close_matches(typed, known, n=1, cutoff=0.75)
    return f": did you mean {match[0]}?" if match else ""


def _parameters(class_path: str) -> list[str]:
    """The ``__init__`` parameters of the class at ``class_path`` (none if it cannot be imported)."""
    try:
        return [p.name for p in inspect.signature(import_class(class_path)).parameters.values()
                if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    except (ValueError, TypeError):
        return []


def import_class(class_path: str | None) -> type | None:
    """The class at the dotted ``class_path``, as a config names it (None if it names none)."""
    module, _, name = (class_path or "").rpartition(".")
    try:
        found = getattr(importlib.import_module(module), name, None) if module else None
    except ImportError:
        return None
    return found if isinstance(found, type) else None


def _type_name(annotation: str) -> str:
    """``<class 'int'>`` -> ``int``, ``<class 'NoneType'>`` -> ``null``, ``typing.Literal['a', 'b']`` -> ``one of 'a', 'b'``."""
    if annotation.startswith("typing.Literal["):
        return f"one of {annotation[len('typing.Literal['):-1]}"
    name = annotation[len("<class '"):-2]
    return "null" if name == "NoneType" else name


class OneLineArgumentParser(argparse.ArgumentParser):
    """An argparse parser (``ue grid``, its subcommands too) refusing a command line in one ``ue: error:``
    line naming the fix, exit 2; the usage stays with ``--help``, argparse's own output with ``UE_DEBUG=1``."""

    def error(self, message: str) -> NoReturn:
        if debugging():
            super().error(message)
        print(f"ue: error: {self.prog}: {message} (`{self.prog} --help` lists the options)", file=sys.stderr)
        self.exit(2)


class OneLineParser(OneLineErrors, ArgumentParser):
    """jsonargparse's parser, refusing a command line in one ``ue: error:`` line (``ue export|protect|pipeline``)."""


@contextmanager
def quiet_lightning() -> Iterator[None]:
    """Lightning's INFO lines (devices, stop reasons) and its small-data warnings, silenced for a run."""
    with lightning_info_off(), warnings.catch_warnings():
        for noise in ("does not have many workers", "is smaller than the logging", "no `validation_step`",
                      "LeafSpec"):
            warnings.filterwarnings("ignore", message=f".*{noise}")
        yield
