"""LightningModules: the victim, the score estimator and the noise generators."""

from ue_lightning.modules.em import ErrorMinimizingNoise
from ue_lightning.modules.baselines import LinearSeparableNoise, RandomNoise, TargetedAdversarialPoison
from ue_lightning.modules.robust import RobustNoiseGenerator
from ue_lightning.modules.score import ScoreEstimator
from ue_lightning.modules.victim import VictimClassifier
from ue_lightning.modules.tue import TransferableNoise
from ue_lightning.modules.ssl_victim import ContrastiveVictim, SimCLRVictim

__all__ = ["ErrorMinimizingNoise", "RobustNoiseGenerator", "LinearSeparableNoise", "RandomNoise", "TargetedAdversarialPoison", "ScoreEstimator", "VictimClassifier", "TransferableNoise", "ContrastiveVictim", "SimCLRVictim"]
