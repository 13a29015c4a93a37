"""The surrogate ``ue protect`` makes noise with, read from a checkpoint (a released one, or the quick one).

Any checkpoint of the package's modules that hold a classifier as ``self.model`` serves
(an :class:`~ue_lightning.modules.ErrorMinimizingNoise` or
:class:`~ue_lightning.modules.RobustNoiseGenerator` fit, or a victim). The CIFAR forms end
in adaptive average pooling, and the torchvision forms too, so a surrogate trained at
32x32 takes an image of any size. Class-wise noise comes from the noise state of a
class-wise ``ErrorMinimizingNoise`` checkpoint (:func:`load_class_noise`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from ue_lightning.models.checkpoint import (check_fits, load_checkpoint_file, load_weights,
                                           read_classifier_checkpoint)
from ue_lightning.models.registry import classifier_from_weights
from ue_lightning.modules.em import CHECKPOINT_KEY
from ue_lightning.modules.robust import RobustNoiseGenerator
from ue_lightning.protect.noise import Surrogate

SURROGATES = "ErrorMinimizingNoise or RobustNoiseGenerator (ue fit --config configs/data/<data>.yaml --config configs/generator/em-*.yaml)"
FIX = ("pass the last.ckpt of a generator fit, or leave --checkpoint out to train a quick surrogate on the "
       "folder itself")


def load_surrogate(path: str | Path, device: torch.device) -> Surrogate:
    """The frozen surrogate of the checkpoint at ``path`` (read with ``weights_only=True``)."""
    hp, weights = read_classifier_checkpoint(path, name="--checkpoint", expected=SURROGATES, fix=FIX)
    model = classifier_from_weights(hp, weights, name=f"--checkpoint {path}")
    model.eval().requires_grad_(False).to(device)
    return Surrogate(model, int(hp["num_classes"]), int(hp["in_channels"]), str(path))


def load_class_noise(path: str | Path) -> Tensor:
    """float (K, C, h, w), pixel units: the class noise of a class-wise ``ErrorMinimizingNoise`` checkpoint."""
    ckpt = load_checkpoint_file(path, name="--checkpoint", fix=FIX)
    state = ckpt.get(CHECKPOINT_KEY) if isinstance(ckpt, dict) else None
    state = state if isinstance(state, dict) else {}
    noise = state.get("noise")
    if state.get("mode") != "classwise" or not isinstance(noise, Tensor) or noise.dim() != 4:
        raise ValueError(f"--checkpoint {path} holds no class-wise noise (--method em-classwise needs the last.ckpt of "
                         "`ue fit ... --config configs/generator/em-classwise.yaml`): use --method em with it, or "
                         "leave --checkpoint out to train a quick class-wise generator on the folder")
    return noise.float()


def robust_step_size(epsilon: float, steps: int) -> float:
    """alpha_u (1/255 units) of ``steps`` noise steps within ``epsilon``: REM's ratio (10 steps of rho_u / 5) kept at
    any step count, so the steps travel twice the budget (from a random start, fewer steps of rho_u / 5 would leave
    the noise near its random start: 4 such steps of 1.6/255 cannot reach the 8/255 edge), at least 0.25/255.
    Fang et al. name alpha_u and K_u without values (../shared/papers/001_7979b3883c294936.txt, Algorithm 1,
    line 130); the 10 x rho_u / 5 is REM's code (``scripts/cifar10/gen_rem.sh``); keeping its travel is ours."""
    return max(2 * epsilon / steps, 0.25)


ROBUST = "RobustNoiseGenerator (ue fit --config configs/data/<data>.yaml --config configs/generator/rem.yaml)"


def load_robust_generator(path: str | Path, device: torch.device, epsilon: float, *, collapse: bool = False,
                          score_checkpoint: str | Path | None = None) -> RobustNoiseGenerator:
    """The RobustNoiseGenerator of the checkpoint at ``path`` (read with ``weights_only=True``), frozen, with its
    noise budget set to ``epsilon`` (1/255 units; alpha_u from :func:`robust_step_size`).

    ``collapse=False``: REM's noise step (min over delta_u of the loss under its PGD adversary, over random crops
    and flips) at any size, whatever score model the generator was fitted with. ``collapse=True``: data collapse's
    step, the same plus a step of alpha_s = alpha_u down the norm of the class-conditional score of
    ``score_checkpoint`` (None: the ScoreEstimator checkpoint the generator was fitted with), a model of the
    generator's classes, channels and image size. The score model is loaded here, so a wrong or missing one is
    refused before any photo is written.
    """
    hp, weights = read_classifier_checkpoint(path, name="--checkpoint", expected=ROBUST, fix=FIX)
    if "adv_radius" not in hp:
        raise ValueError(f"--checkpoint {path} is not a RobustNoiseGenerator checkpoint (--method rem and collapse "
                         f"make their noise with its adversarially trained surrogate): {FIX}, or use --method em "
                         "with it")
    accepted = ("arch", "num_classes", "in_channels", "image_size", "width", "steps", "adv_radius", "adv_step_size",
                "adv_steps", "eot_samples", "eot_padding", "eot_flip", "form", "start", "seed")
    kwargs = {k: hp[k] for k in accepted if k in hp}
    step_size = robust_step_size(epsilon, int(hp.get("steps", 10)))
    if collapse:
        score_checkpoint = score_checkpoint or hp.get("score_checkpoint")
        if not score_checkpoint:
            raise ValueError(f"--checkpoint {path} was fitted without a score model (it is REM's): pass its "
                             "ScoreEstimator checkpoint with --score_checkpoint, or use --method rem with it")
        kwargs.update(score_checkpoint=str(score_checkpoint), score_step_size=step_size)

    def build() -> RobustNoiseGenerator:
        return RobustNoiseGenerator(**kwargs, epsilon=epsilon, step_size=step_size)

    with torch.device("meta"):
        skeleton = build()
    check_fits(skeleton.model, weights, name=f"--checkpoint {path}", what=f"{hp['arch']} (width={hp.get('width')})")
    generator = build()
    load_weights(generator.model, weights, name=f"--checkpoint {path}", what=hp["arch"])
    generator.eval().requires_grad_(False).to(device)
    if collapse:  # load it now: a wrong one is refused before any photo, with the owner's fix (not a config)
        generator.score_model(device, fix="--method collapse needs the ScoreEstimator checkpoint the generator was "
                                          "fitted with: pass it as --score_checkpoint (or leave --checkpoint out to "
                                          "train a quick one on the folder)")
    return generator
