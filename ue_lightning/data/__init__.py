"""Datasets, the UEDataModule and the noise file."""

from ue_lightning.data.datamodule import ProtectedImages, UEDataModule, protected_mask, stratified_subset
from ue_lightning.data.datasets import DATASETS, CleanImages, ImageArray, ImageFiles, load_dataset
from ue_lightning.data.noise_file import (
    DataFingerprint,
    NoiseFile,
    NoiseFileError,
    NoiseFileWriter,
    NoiseMetadata,
    apply_delta,
    quantize_delta,
)

__all__ = [
    "DATASETS", "CleanImages", "DataFingerprint", "ImageArray", "ImageFiles", "NoiseFile", "NoiseFileError",
    "NoiseFileWriter", "NoiseMetadata", "ProtectedImages", "UEDataModule", "apply_delta", "load_dataset",
    "protected_mask", "quantize_delta", "stratified_subset",
]
