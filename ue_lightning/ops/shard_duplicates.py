"""The duplicates a ``DistributedSampler`` pads its shards with, and how every consumer drops them.

To give every rank the same number of samples, ``DistributedSampler`` repeats a few indices.
After an all-gather (or when rank shards are merged) those samples appear twice; every
consumer keeps the first copy, so one-process and many-process runs see the same samples.
"""

from __future__ import annotations

import torch
from torch import Tensor


def first_occurrences(index: Tensor) -> Tensor:
    """Bool mask (B,) keeping the first occurrence of every value of ``index`` (B,), int64."""
    order = torch.argsort(index, stable=True)
    sorted_index = index[order]
    first = torch.ones_like(sorted_index, dtype=torch.bool)
    first[1:] = sorted_index[1:] != sorted_index[:-1]
    keep = torch.zeros_like(first)
    keep[order[first]] = True
    return keep


def first_unseen(index: Tensor, seen: Tensor) -> Tensor:
    """Bool mask over ``index`` (CPU int64): the first occurrence of each index not yet ``seen``.

    Marks the kept indices in ``seen`` (bool, one entry per sample of the split), so a pass
    over batches updates and counts every sample exactly once.
    """
    keep = first_occurrences(index) & ~seen[index]
    seen[index[keep]] = True
    return keep
