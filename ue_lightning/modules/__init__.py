"""LightningModules: the victim, the score estimator and the noise generators."""

from ue_lightning.modules.score import ScoreEstimator
from ue_lightning.modules.victim import VictimClassifier

__all__ = ["ScoreEstimator", "VictimClassifier"]
