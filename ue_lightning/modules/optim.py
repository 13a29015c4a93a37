"""SGD (or AdamW, for the ViT victim) with the schedules the papers use, stepped per optimiser step."""

from __future__ import annotations

from typing import Callable, Iterable, Literal

import torch


def optimizer_with_schedule(
    params: Iterable[torch.nn.Parameter],
    total_steps: int | float,
    *,
    lr: float,
    optimizer: Literal["sgd", "adamw"] = "sgd",
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    schedule: Literal["cosine", "step", "constant", "triangular"] = "cosine",
    milestones: Iterable[float] = (0.4, 0.8),
    gamma: float = 0.1,
    nesterov: bool = False,
    warmup: float = 0.2,
) -> dict:
    """Lightning's ``configure_optimizers`` answer: SGD (``momentum``, ``nesterov``) or AdamW (torch's betas;
    transformers train poorly with SGD) with ``weight_decay``, and a per-step LR schedule.

    ``milestones`` are fractions of ``total_steps`` (REM's victim: 16k and 32k of 40k
    steps = 0.4, 0.8), so one config serves any epoch or step budget. ``triangular``
    rises linearly from ``lr / (w + 1)`` to ``lr`` at step ``w = round(warmup * total_steps)``
    (0-based), then falls linearly to ``lr / (total_steps - w)`` at the last step
    (``warmup=0``: a plain linear decay; airbench's short schedule is of this shape).
    """
    if optimizer == "sgd":
        optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)
    elif optimizer == "adamw":
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    else:
        raise ValueError(f"optimizer={optimizer!r}: choose sgd or adamw")
    total = max(1, int(total_steps))
    if schedule == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
    elif schedule == "step":
        steps = sorted(int(f * total) for f in milestones)
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=steps, gamma=gamma)
    elif schedule == "constant":
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    elif schedule == "triangular":
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, triangular(total, warmup))
    else:
        raise ValueError(f"schedule={schedule!r}: choose cosine, step, constant or triangular")
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def triangular(total_steps: int, warmup: float) -> Callable[[int], float]:
    """LR factor of step ``s`` (0-based): ``(s + 1) / (w + 1)`` for ``s < w``, then ``(total - s) / (total - w)``."""
    if not 0.0 <= warmup <= 1.0:
        raise ValueError(f"warmup={warmup} must be a fraction of the steps, in [0, 1]")
    peak = round(warmup * total_steps)

    def factor(step: int) -> float:
        if step < peak:
            return (step + 1) / (peak + 1)
        return max(total_steps - step, 1) / max(total_steps - peak, 1)

    return factor
