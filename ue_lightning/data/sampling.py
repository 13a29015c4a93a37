"""Seeded choices of samples: a class-stratified train subset and held-out validation split, a protected share.

Each is a function of the labels and a seed alone, so every process of a DDP run draws the same samples.
"""

from __future__ import annotations

import torch
from torch import Tensor


def stratified_subset(labels: Tensor, size: int, seed: int) -> Tensor:
    """Sorted indices of a seeded, class-stratified subset of exactly ``size`` samples.

    Each class keeps its share of ``size`` (largest-remainder rounding), drawn at random.
    """
    labels = torch.as_tensor(labels)
    n = len(labels)
    if not 0 < size <= n:
        raise ValueError(f"train_subset={size} must be between 1 and the split size {n}")
    classes, counts = labels.unique(return_counts=True)
    exact = counts.double() * size / n
    quota = exact.floor().long()
    order = torch.argsort(exact - quota.double(), descending=True, stable=True)
    quota[order[: size - int(quota.sum())]] += 1
    g = torch.Generator().manual_seed(seed)
    chosen = []
    for c, k in zip(classes.tolist(), quota.tolist()):
        members = (labels == c).nonzero().flatten()
        chosen.append(members[torch.randperm(len(members), generator=g)[:k]])
    return torch.cat(chosen).sort().values


def held_out_split(labels: Tensor, fraction: float, seed: int) -> Tensor:
    """Bool mask (len(labels),) of a seeded, class-stratified ``fraction`` of the samples to hold out.

    The rest is ``stratified_subset(labels, n - round(fraction * n), seed)``, so the held-out samples are
    what a ``train_subset`` of that size with the same seed leaves out. Refuses a fraction that leaves a
    class with no sample on either side.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"val_fraction={fraction} must be in [0, 1)")
    labels = torch.as_tensor(labels)
    n = len(labels)
    held = torch.zeros(n, dtype=torch.bool)
    if fraction == 0.0:
        return held
    size = int(round(fraction * n))
    if not 0 < size < n:
        raise ValueError(f"val_fraction={fraction} holds out {size} of the {n} train samples: "
                         "choose a fraction that leaves samples on both sides (or 0 for no validation)")
    held[:] = True
    held[stratified_subset(labels, n - size, seed)] = False
    for c in labels.unique().tolist():
        members = labels == c
        if not held[members].any() or held[members].all():
            empty = not held[members].any()
            side, fix = ("validation", "a larger fraction, or 0") if empty else ("train", "a smaller one")
            raise ValueError(f"val_fraction={fraction} leaves class {c} (of {int(members.sum())} train samples) "
                             f"with no {side} sample: choose {fix}")
    return held


def protected_mask(num_samples: int, candidates: Tensor, fraction: float, seed: int) -> Tensor:
    """Bool mask (num_samples,) marking exactly round(fraction * len(candidates)) of them."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"protected_fraction={fraction} must be in [0, 1]")
    k = int(round(fraction * len(candidates)))
    g = torch.Generator().manual_seed(seed + 1)
    mask = torch.zeros(num_samples, dtype=torch.bool)
    mask[candidates[torch.randperm(len(candidates), generator=g)[:k]]] = True
    return mask
