"""The noise ``ue protect`` gives a batch of same-size photos, one class per ``--method``.

Each is built from a generator checkpoint and called as ``noise(jobs, colours, index) -> (labels, deltas)``:
``colours`` uint8 (B, C, H, W), 0-255; ``index`` (B,) the photos' places in the folder; ``labels`` int64 (B,),
the class each noise was made for; ``deltas`` int8 (B, C, H, W) in 1/255 units, ``colours + deltas`` in 0-255.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ue_lightning.protect.images import ImageJob
from ue_lightning.protect.noise import (Surrogate, at_working_size, class_pattern_delta, error_minimizing_deltas,
                                        match_channels, predicted_labels)
from ue_lightning.protect.surrogate import load_class_noise, load_robust_generator, load_surrogate

#: ``--method`` -> the kind of quick generator trained when no ``--checkpoint`` is given.
MODES = {"em": "samplewise", "em-classwise": "classwise", "rem": "robust", "collapse": "collapse"}


class SamplewiseNoise:
    """``--method em``: PGD against the checkpoint's surrogate, at the image's size (or its working size), towards
    the image's class (class i: the surrogate's label i mod K) or, in a flat folder, the surrogate's own prediction."""

    def __init__(self, checkpoint: str, classes: list[str], settings: dict[str, Any], device: torch.device):
        self.surrogate = load_surrogate(checkpoint, device)
        self.classes, self.settings = classes, settings
        self.num_classes = self.surrogate.num_classes

    def labels(self, jobs: list[ImageJob], colours: Tensor) -> Tensor:
        """int64 (B,): the label each image's noise is made for."""
        if jobs[0].class_name is None:
            return predicted_labels(self.surrogate, colours)
        return torch.tensor([self.classes.index(j.class_name) % self.num_classes for j in jobs])

    def __call__(self, jobs: list[ImageJob], colours: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
        """``(labels (B,), int8 delta (B, C, H, W) in 1/255 units)`` of same-size uint8 images (B, C, H, W);
        ``index`` (B,): their places in the folder (unused: this noise has no random draws)."""
        labels, s = self.labels(jobs, colours), self.settings
        return labels, error_minimizing_deltas(self.surrogate, colours, labels, epsilon=s["epsilon"],
                                               steps=s["steps"], step_size=s["step_size"],
                                               working_size=s["working_size"], eot_jpeg=s.get("eot_jpeg", 0),
                                               eot_views=s.get("eot_views", "both"))


class ClasswiseNoise:
    """``--method em-classwise``: the class pattern of the checkpoint's class-wise EM, stretched over the image."""

    def __init__(self, checkpoint: str, classes: list[str], settings: dict[str, Any], device: torch.device):
        self.patterns = load_class_noise(checkpoint)  # (K, C, h, w), pixel units
        self.classes, self.epsilon = classes, settings["epsilon"]
        self.num_classes = len(self.patterns)

    def __call__(self, jobs: list[ImageJob], colours: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
        """``(labels (B,), int8 delta (B, C, H, W) in 1/255 units)`` of same-size uint8 images (B, C, H, W);
        ``index`` (B,): their places in the folder (unused: this noise has no random draws)."""
        labels = torch.tensor([self.classes.index(j.class_name) % self.num_classes for j in jobs])
        deltas = [class_pattern_delta(self.patterns[int(y)], c, self.epsilon) for y, c in zip(labels, colours)]
        return labels, torch.stack(deltas)


class RobustNoise:
    """``--method rem``: REM's noise step against a RobustNoiseGenerator checkpoint's adversarially trained surrogate
    (:func:`~ue_lightning.protect.surrogate.load_robust_generator`), at the image's size (or its working size),
    towards the image's class or, in a flat folder, the surrogate's prediction. Each image's random draws (start,
    crops, flips, the adversary's start) are keyed by its place in the folder: batching does not change them."""

    def __init__(self, checkpoint: str, classes: list[str], settings: dict[str, Any], device: torch.device):
        self.generator = load_robust_generator(checkpoint, device, settings["epsilon"], collapse=self.collapse,
                                               score_checkpoint=settings.get("score_checkpoint"))
        self.surrogate = Surrogate(self.generator.model, self.generator.hparams.num_classes,
                                   self.generator.hparams.in_channels, str(checkpoint))
        self.classes, self.settings, self.device = classes, settings, device
        self.num_classes = self.surrogate.num_classes

    labels = SamplewiseNoise.labels

    collapse = False  # REM's step: no score step, even with a collapse generator

    def __call__(self, jobs: list[ImageJob], colours: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
        """``(labels (B,), int8 delta (B, C, H, W) in 1/255 units)`` of same-size uint8 images (B, C, H, W)."""
        labels = self.labels(jobs, colours)

        def defend(x: Tensor, y: Tensor) -> Tensor:
            x3 = match_channels(x, self.surrogate.in_channels)
            delta = self.generator.generate(x3, y, index.to(x.device))
            return delta if x.shape[1] == x3.shape[1] else delta.mean(dim=1, keepdim=True)

        return labels, at_working_size(defend, colours, labels, self.settings["epsilon"],
                                       self.settings["working_size"], self.device)


class CollapseNoise(RobustNoise):
    """``--method collapse``: data collapse's noise step (Fang et al., Algorithm 1, with REM's min-min-max step as the
    package's collapse generator runs it): REM's step plus a step down the norm of the class-conditional score of
    ``settings["score_checkpoint"]`` (None: the one the generator was fitted with), so each class's photos move
    towards dense points of their class. The score model sees the photo at the size the noise is made at (any
    size: it is padded)."""

    collapse = True


NOISE_MAKERS = {"em": SamplewiseNoise, "em-classwise": ClasswiseNoise, "rem": RobustNoise, "collapse": CollapseNoise}


