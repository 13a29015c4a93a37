"""Classifier zoo (CIFAR and ImageNet forms) and the class-conditional score network.

All classifiers take pixels in ``[0, 1]`` and normalise internally; see
:func:`build_classifier`.
"""

from .airbench import PatchWhitening, airbench_classifier
from .batchnorm import batchnorm_statistics_frozen, in_mode
from .cifar import cifar_densenet121, cifar_resnet18, cifar_resnet50, cifar_vgg16, cifar_wrn34_10
from .imagenet import imagenet_classifier
from .normalize import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageClassifier,
    Normalize,
    default_mean_std,
)
from .registry import ARCHITECTURES, IMAGENET_MIN_SIZE, build_classifier
from .frozen_score import FrozenScore, load_frozen_score
from .score_net import ScoreNet

__all__ = [
    "ARCHITECTURES",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "IMAGENET_MEAN",
    "IMAGENET_MIN_SIZE",
    "IMAGENET_STD",
    "ImageClassifier",
    "Normalize",
    "PatchWhitening",
    "FrozenScore",
    "ScoreNet",
    "load_frozen_score",
    "airbench_classifier",
    "batchnorm_statistics_frozen",
    "in_mode",
    "build_classifier",
    "cifar_densenet121",
    "cifar_resnet18",
    "cifar_resnet50",
    "cifar_vgg16",
    "cifar_wrn34_10",
    "default_mean_std",
    "imagenet_classifier",
]
