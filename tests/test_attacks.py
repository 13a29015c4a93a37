"""PGD: inside the box and [0, 1], moves the loss the right way, leaves parameter grads alone."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ue_lightning.ops.attacks import budget_to_pixels, pgd_maximize, pgd_minimize
from ue_lightning.models import build_classifier


@pytest.fixture
def model_and_batch():
    torch.manual_seed(0)
    model = build_classifier("resnet18", 10, in_channels=3, image_size=16, width=4).eval()
    x = torch.rand(8, 3, 16, 16)
    x[0] = 0.0  # pixels at the bounds: projection must keep x + delta in [0, 1]
    x[1] = 1.0
    y = torch.arange(8) % 10
    return model, x, y


def _loss(model, y):
    return lambda z: F.cross_entropy(model(z), y, reduction="sum")


@pytest.mark.parametrize("attack, sign", [(pgd_maximize, 1), (pgd_minimize, -1)])
def test_pgd_bounds_and_direction(model_and_batch, attack, sign):
    model, x, y = model_and_batch
    radius = 8 / 255
    delta = attack(_loss(model, y), x, radius=radius, step_size=2 / 255, steps=5, random_start=True)
    assert delta.abs().max() <= radius + 1e-6
    assert (x + delta).min() >= 0 and (x + delta).max() <= 1
    with torch.no_grad():
        before = F.cross_entropy(model(x), y).item()
        after = F.cross_entropy(model(x + delta), y).item()
    assert sign * (after - before) > 0.01


def test_pgd_leaves_parameter_grads_untouched(model_and_batch):
    model, x, y = model_and_batch
    params = list(model.parameters())
    params[0].grad = torch.full_like(params[0], 3.0)
    pgd_maximize(_loss(model, y), x, radius=4 / 255, step_size=1 / 255, steps=3)
    assert torch.equal(params[0].grad, torch.full_like(params[0], 3.0))
    assert all(p.grad is None for p in params[1:])


def test_pgd_runs_under_no_grad_and_inference_mode(model_and_batch):
    model, x, y = model_and_batch
    with torch.inference_mode():
        delta = pgd_minimize(_loss(model, y), x, radius=4 / 255, step_size=1 / 255, steps=2)
    assert delta.abs().max() > 0


def test_zero_steps_zero_start_is_zero(model_and_batch):
    model, x, y = model_and_batch
    assert torch.equal(pgd_minimize(_loss(model, y), x, radius=0.1, step_size=0.01, steps=0), torch.zeros_like(x))


@pytest.mark.parametrize("bad", [-1, 0.0314, 100])
def test_budget_in_wrong_units_is_refused(bad):
    with pytest.raises(ValueError, match="1/255 units"):
        budget_to_pixels(bad, "epsilon")


def test_budget_conversion():
    assert budget_to_pixels(8, "epsilon") == pytest.approx(8 / 255)
    assert budget_to_pixels(0, "adv_radius") == 0
    with pytest.raises(ValueError):
        budget_to_pixels(0, "epsilon", allow_zero=False)


def test_logit_margin_steps_like_cross_entropy_and_keeps_moving_when_it_underflows():
    from ue_lightning.ops.attacks import cross_entropy_sum, input_gradient, logit_margin_sum

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 4))
    x, y = torch.rand(5, 3, 2, 2), torch.tensor([0, 1, 2, 3, 0])
    zero = torch.zeros_like(x)
    _, g_ce = input_gradient(cross_entropy_sum(model, y), x, zero)
    _, g_margin = input_gradient(logit_margin_sum(model, y), x, zero)
    assert torch.equal(g_ce.sign(), g_margin.sign())
    with torch.no_grad():
        model[1].weight.mul_(1e4)  # p_y rounds to 1 (or 0): cross-entropy's gradient vanishes for some samples
    _, g_ce = input_gradient(cross_entropy_sum(model, y), x, zero)
    _, g_margin = input_gradient(logit_margin_sum(model, y), x, zero)
    assert (g_ce.flatten(1).abs().sum(1) == 0).any() and (g_margin.flatten(1).abs().sum(1) > 0).all()
