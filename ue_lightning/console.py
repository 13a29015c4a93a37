"""What the package prints besides its results: progress bars, and the third-party lines it silences.

Progress bars are tqdm bars shown only where someone can watch them: on a terminal (tqdm's
``disable=None``: none when the output goes to a file or a pipe, so logs hold no bar updates), and,
inside a Lightning run, only on global rank 0 and when the trainer shows Lightning's tqdm bar; they
then sit on the line below it and are cleared when their loop ends. ``ue pipeline`` turns Lightning's
bars off when its output is not a terminal and uses :class:`TransientProgressBar` when it is.

``UE_DEBUG=1`` shows everything the package would silence (and ``ue``'s tracebacks): see :func:`debugging`.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from typing import Iterable

from lightning.pytorch.callbacks import TQDMProgressBar
from tqdm import tqdm


def debugging() -> bool:
    """``UE_DEBUG`` is set: show tracebacks, third-party warnings and Lightning's INFO lines as they come."""
    return bool(os.environ.get("UE_DEBUG"))


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
