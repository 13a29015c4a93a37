"""Unregistered: a helper model a LightningModule uses but does not own.

``nn.Module.__setattr__`` registers every module assigned to an attribute, so it would enter
``state_dict`` (the checkpoint), ``parameters()`` (the optimiser, DDP's gradient sync) and
``.to()``. A frozen helper (the robust generator's score model, the SSL victim's linear probe
fitted at test time) must stay out of all three: hold it in an :class:`Unregistered`, which
the module tree does not see. The owner moves it where it is used, with :meth:`Unregistered.on`.
"""

from __future__ import annotations

from typing import Generic, TypeVar

import torch

T = TypeVar("T")


class Unregistered(Generic[T]):
    """Holds ``value`` (None until set) out of its owner's ``state_dict``, ``parameters()`` and ``.to()``.

    Example: ``self._score = Unregistered()`` in ``__init__``, ``self._score.value = load(...)``
    later, and ``self._score.on(x.device)`` where it is used.
    """

    __slots__ = ("value",)

    def __init__(self, value: T | None = None):
        self.value = value

    def on(self, device: torch.device | str | None) -> T | None:
        """The value, first moved to ``device`` (in place, like ``nn.Module.to``) unless that is None."""
        if device is not None and self.value is not None:
            self.value = self.value.to(device)
        return self.value

    def __repr__(self) -> str:
        return f"Unregistered({type(self.value).__name__})"
