"""The differentiable crop/flip that generators use for EOT and surrogate augmentation."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ue_lightning.ops.augment import crop_flip, random_crop_flip


def test_crop_flip_equals_a_per_sample_slice_of_the_padded_image():
    torch.manual_seed(0)
    x = torch.rand(6, 3, 8, 8)
    sy, sx = torch.tensor([0, 1, 2, 4, 3, 0]), torch.tensor([4, 0, 2, 1, 3, 0])
    flip = torch.tensor([False, True, False, True, True, False])
    out = crop_flip(x, sy, sx, flip, padding=2)
    padded = F.pad(x, (2,) * 4)
    for i in range(6):
        want = padded[i, :, sy[i]:sy[i] + 8, sx[i]:sx[i] + 8]
        assert torch.equal(out[i], want.flip(-1) if flip[i] else want)


def test_gradient_reaches_exactly_the_kept_pixels():
    x = torch.rand(4, 1, 8, 8, requires_grad=True)
    random_crop_flip(x, 2, index=torch.arange(4), seed=0, salt=1).sum().backward()
    kept = x.grad.flatten(1).sum(1)
    assert torch.all((x.grad == 0) | (x.grad == 1)) and torch.all(kept >= 36) and torch.all(kept <= 64)


def test_indexed_draws_do_not_depend_on_the_batch():
    x = torch.rand(5, 3, 8, 8)
    index = torch.tensor([7, 3, 9, 1, 4])
    whole = random_crop_flip(x, 4, index=index, seed=3, salt=2)
    part = random_crop_flip(x[2:], 4, index=index[2:], seed=3, salt=2)
    assert torch.equal(whole[2:], part)
