"""L-infinity attacks as small pure functions over a loss callable.

Conventions shared by every module of the package:

* images ``x`` are float tensors of shape (B, C, H, W) with pixels in [0, 1];
* a perturbation ``delta`` has the same shape and lives in the box
  ``[-radius, radius]`` with ``x + delta`` inside [0, 1];
* ``radius`` and ``step_size`` are in pixel units (8/255, not 8);
* ``loss_fn(x_perturbed) -> Tensor`` returns a scalar (sum or mean over the batch:
  sign steps do not care about the scale).

Input gradients come from :func:`torch.autograd.grad` with the perturbation as the
only input, so the gradients of the model's parameters are neither computed nor
touched. Call these functions under ``torch.enable_grad()`` if Lightning runs the
caller under no-grad (validation, predict); :func:`pgd` does this itself.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LossFn = Callable[[Tensor], Tensor]


def cross_entropy_sum(model: nn.Module, y: Tensor) -> LossFn:
    """The usual loss callable: summed cross-entropy of ``model`` on a perturbed batch against ``y``.

    Summed, not averaged, so a sample's input gradient does not depend on its batch size.
    """
    return lambda x: F.cross_entropy(model(x), y, reduction="sum")


def logit_margin_sum(model: nn.Module, y: Tensor) -> LossFn:
    """``sum_b (logsumexp_{j != y} z_j - z_y)``: cross-entropy's sign steps without its underflow.

    Cross-entropy's input gradient is ``(1 - p_y)`` times this loss's, so sign steps are the
    same; but once a confident model's ``p_y`` rounds to 1 in float32, cross-entropy's
    gradient is exactly zero and PGD stops moving, while this one still has a direction.
    Needs two or more classes.
    """
    def loss(x: Tensor) -> Tensor:
        logits = model(x)
        target = F.one_hot(y, logits.shape[1]).bool()
        others = logits.masked_fill(target, float("-inf")).logsumexp(dim=1)
        return (others - logits.gather(1, y.view(-1, 1)).squeeze(1)).sum()

    return loss


def project_linf(delta: Tensor, x: Tensor, radius: float) -> Tensor:
    """Project ``delta`` onto ``[-radius, radius]`` with ``x + delta`` in [0, 1]."""
    delta = delta.clamp(-radius, radius)
    return (x + delta).clamp(0.0, 1.0) - x


def box_start(u: Tensor, x: Tensor, radius: float) -> Tensor:
    """The perturbation ``(2u - 1) * radius`` for uniforms ``u`` in [0, 1) shaped as ``x``, projected."""
    return project_linf((2.0 * u.to(device=x.device, dtype=x.dtype) - 1.0) * radius, x, radius)


def uniform_start(x: Tensor, radius: float, generator: torch.Generator | None = None) -> Tensor:
    """A uniformly random perturbation in the radius-``radius`` box, projected."""
    u = torch.rand(x.shape, generator=generator, device=x.device if generator is None else "cpu")
    return box_start(u, x, radius)


def input_gradient(loss_fn: LossFn, x: Tensor, delta: Tensor) -> tuple[Tensor, Tensor]:
    """Return ``(loss, d loss / d delta)`` at ``x + delta`` without touching parameter grads."""
    delta = delta.detach().requires_grad_(True)
    loss = loss_fn(x + delta)
    (grad,) = torch.autograd.grad(loss, delta)
    return loss.detach(), grad


def pgd(
    loss_fn: LossFn,
    x: Tensor,
    *,
    radius: float,
    step_size: float,
    steps: int,
    maximize: bool,
    init: Tensor | None = None,
    random_start: bool = False,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Projected sign-gradient steps on ``loss_fn(x + delta)``; returns the final delta.

    Args:
        loss_fn: maps a perturbed batch (B, C, H, W) in [0, 1] to a scalar loss.
        x: clean batch (B, C, H, W), pixels in [0, 1].
        radius: L-infinity bound of delta, in pixel units (e.g. 8/255).
        step_size: size of each sign step, in pixel units.
        steps: number of steps (0 returns the start point).
        maximize: ascend the loss (an adversarial example) or descend it
            (error-minimising noise).
        init: starting delta (projected first); zero when absent.
        random_start: start uniformly at random in the box instead (ignored if ``init``).
        generator: optional RNG for the random start (reproducible per batch).
    """
    with torch.inference_mode(False), torch.enable_grad():  # Lightning may run us under either
        x = x.detach().clone()
        init = None if init is None else init.detach().clone()
        return _pgd_steps(loss_fn, x, radius, step_size, steps, maximize, init, random_start, generator)


def _pgd_steps(loss_fn: LossFn, x: Tensor, radius: float, step_size: float, steps: int, maximize: bool,
               init: Tensor | None, random_start: bool, generator: torch.Generator | None) -> Tensor:
    if init is not None:
        delta = project_linf(init.detach(), x, radius)
    elif random_start:
        delta = uniform_start(x, radius, generator)
    else:
        delta = torch.zeros_like(x)
    sign = 1.0 if maximize else -1.0
    for _ in range(steps):
        _, grad = input_gradient(loss_fn, x, delta)
        delta = project_linf(delta + sign * step_size * grad.sign(), x, radius)
    return delta.detach()


def pgd_maximize(loss_fn: LossFn, x: Tensor, *, radius: float, step_size: float, steps: int,
                 random_start: bool = True, init: Tensor | None = None,
                 generator: torch.Generator | None = None) -> Tensor:
    """PGD ascent (Madry et al.): the worst-case delta within ``radius``."""
    return pgd(loss_fn, x, radius=radius, step_size=step_size, steps=steps, maximize=True,
               init=init, random_start=random_start, generator=generator)


def pgd_minimize(loss_fn: LossFn, x: Tensor, *, radius: float, step_size: float, steps: int,
                 random_start: bool = False, init: Tensor | None = None,
                 generator: torch.Generator | None = None) -> Tensor:
    """PGD descent: the error-minimising delta within ``radius`` (Huang et al.)."""
    return pgd(loss_fn, x, radius=radius, step_size=step_size, steps=steps, maximize=False,
               init=init, random_start=random_start, generator=generator)


def budget_to_pixels(value: float, name: str, *, allow_zero: bool = True, limit: float = 64.0) -> float:
    """Convert a budget given in 1/255 units (configs write ``8`` for 8/255) to pixel units.

    Refuses, with a message naming the fix: a negative value; one above ``limit`` (64 by
    default: larger budgets are not imperceptible and usually mean a unit mix-up); a
    value in (0, 0.25), which is almost surely a pixel-unit value such as 0.0314; and
    zero where ``allow_zero`` is False.
    """
    value = float(value)
    too_small = value < 0 or (value == 0 and not allow_zero) or 0 < value < 0.25
    if too_small or value > limit:
        low = "0" if allow_zero else "0.25"
        raise ValueError(
            f"{name}={value:g} is out of range: budgets are in 1/255 units ({low} .. {limit:g}); "
            f"write `{name}: 8` for 8/255, not the pixel-unit value 0.0314."
        )
    return value / 255.0
