"""SGD with the schedules the papers use, stepped per optimiser step."""

from __future__ import annotations

from typing import Iterable, Literal

import torch


def sgd_with_schedule(
    params: Iterable[torch.nn.Parameter],
    total_steps: int | float,
    *,
    lr: float,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    schedule: Literal["cosine", "step", "constant"] = "cosine",
    milestones: Iterable[float] = (0.4, 0.8),
    gamma: float = 0.1,
) -> dict:
    """Lightning's ``configure_optimizers`` answer: SGD and a per-step LR schedule.

    ``milestones`` are fractions of ``total_steps`` (REM's victim: 16k and 32k of 40k
    steps = 0.4, 0.8), so one config serves any epoch or step budget.
    """
    optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    total = max(1, int(total_steps))
    if schedule == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
    elif schedule == "step":
        steps = sorted(int(f * total) for f in milestones)
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=steps, gamma=gamma)
    elif schedule == "constant":
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    else:
        raise ValueError(f"schedule={schedule!r}: choose cosine, step or constant")
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
