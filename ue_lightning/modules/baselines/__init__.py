"""Baseline noises for the tables: TAP, uniform random noise and LSP shortcut noise.

Every baseline is a :class:`~ue_lightning.modules.generator_base.NoiseGenerator` with
nothing to train: ``ue predict --config configs/data/<dataset>.yaml --config
configs/generator/<name>.yaml`` (plus its overlay ``configs/generator/<dataset>/<name>.yaml``
where there is one; no ``--ckpt_path``) writes its noise file through ``PerturbationWriter``.

CUDA (Sadasivan et al., class-wise convolution filters) is deliberately *not* here. It
is a multiplicative blur followed by a per-image max normalisation with no L_p budget,
so its change ``blurred - clean`` is not a bounded additive delta: on the CIFAR-10 copy
in ../shared/data (the reference settings: 3x3 kernels U(0, 0.3) with one entry 1.0,
then ``img / img.max()``) the per-image max |delta| has a median of 137/255 and exceeds
the int8 range of the noise file (127) on about 60% of the images (mean |delta| about
22/255). It can neither be stored exactly in the noise file nor be given a meaningful
``epsilon`` (configs refuse budgets above 64/255), and clipping it would make it another
method; it belongs with a transform-based (not additive) protection format.
"""

from ue_lightning.modules.baselines.lsp import LinearSeparableNoise
from ue_lightning.modules.baselines.random_noise import RandomNoise
from ue_lightning.modules.baselines.tap import TargetedAdversarialPoison, load_victim_classifier, target_map

__all__ = ["LinearSeparableNoise", "RandomNoise", "TargetedAdversarialPoison", "load_victim_classifier", "target_map"]
