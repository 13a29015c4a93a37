"""The validation split: a seeded, stratified share of the train split, served clean; never the test split."""

from __future__ import annotations

import hashlib
from pathlib import Path

import lightning as L
import pytest
import torch

from ue_lightning.data import NoiseFile, NoiseMetadata, UEDataModule
from ue_lightning.data.datamodule import held_out_split


def _digest(image: torch.Tensor) -> str:
    """Content fingerprint of a uint8 image (C, H, W)."""
    return hashlib.sha256(image.contiguous().numpy().tobytes()).hexdigest()


def _noise(dm: UEDataModule, path: Path, value: int = 5) -> str:
    """A sample-wise noise file moving every train pixel by ``value`` (1/255 units) for ``dm``'s train split."""
    train = dm.clean_split("train")
    NoiseFile.write(path, torch.full(train.images.shape, value, dtype=torch.int8),
                    NoiseMetadata(method="t", epsilon=value, classwise=False, fingerprint=train.fingerprint()))
    return str(path)


def test_the_split_is_stratified_seeded_and_disjoint_from_training(fake_cifar10):
    dm = UEDataModule("cifar10", root=str(fake_cifar10), val_fraction=0.2, seed=3)
    labels = dm.clean_split("train").targets
    val, fit = dm.val_indices(), dm.victim_indices()
    assert len(val) == 20 and torch.bincount(labels[val], minlength=10).tolist() == [2] * 10  # 10 a class
    assert not set(val.tolist()) & set(fit.tolist())
    assert sorted(val.tolist() + fit.tolist()) == list(range(100))  # nothing lost: the noise covers both
    assert torch.equal(val, UEDataModule("cifar10", root=str(fake_cifar10), val_fraction=0.2, seed=3).val_indices())
    assert not torch.equal(val, UEDataModule("cifar10", root=str(fake_cifar10), val_fraction=0.2, seed=4).val_indices())
    dm.setup("fit")
    assert sorted(dm.train_set.indices) == fit.tolist() and len(dm.predict_set) == 100  # generators: every image
    assert "80 train samples, 20 held out for validation" in dm.describe()


def test_the_split_is_carved_from_train_subset_and_matches_its_complement(fake_cifar10):
    dm = UEDataModule("cifar10", root=str(fake_cifar10), train_subset=50, val_fraction=0.2)
    assert set(dm.val_indices().tolist()) < set(dm.train_indices().tolist()) and len(dm.val_indices()) == 10
    # holding out k of n is the complement of a train_subset of n - k with the same seed
    subset = UEDataModule("cifar10", root=str(fake_cifar10), train_subset=80, seed=1).train_indices()
    held = UEDataModule("cifar10", root=str(fake_cifar10), val_fraction=0.2, seed=1)
    assert torch.equal(held.victim_indices(), subset)


def test_val_images_are_clean_unaugmented_train_images_never_test_images(fake_cifar10, tmp_path):
    """Protected, augmented, defended training; the val batches are still the clean train images."""
    dm = UEDataModule("cifar10", root=str(fake_cifar10), val_fraction=0.3, batch_size=8, augment=True,
                      defence="cutout")
    dm.perturbation = _noise(dm, tmp_path / "n.safetensors")
    dm.setup("fit")
    train, test = dm.clean_split("train"), dm.clean_split("test")
    test_digests = {_digest(test[i][0]) for i in range(len(test))}
    seen = []
    for x, y, index in dm.val_dataloader():
        pixels = (x * 255).round().to(torch.uint8)
        assert torch.equal(pixels, train.images[index]) and torch.equal(y, train.targets[index])
        assert not {_digest(image) for image in pixels} & test_digests
        seen += index.tolist()
    assert seen == dm.val_indices().tolist()
    x, _, index = next(iter(dm.train_dataloader()))  # while training images do carry the noise
    assert not torch.equal((x * 255).round().to(torch.uint8), train.images[index])


def test_no_validation_at_fraction_zero(fake_cifar10):
    dm = UEDataModule("cifar10", root=str(fake_cifar10))
    dm.setup("fit")
    assert dm.val_dataloader() == [] and len(dm.val_indices()) == 0 and len(dm.train_set) == 100


@pytest.mark.parametrize("fraction", [1.5, 1.0, -0.1])
def test_a_fraction_out_of_range_is_refused_in_one_line(fraction):
    with pytest.raises(ValueError, match=rf"^val_fraction={fraction} must be in \[0, 1\)$"):
        UEDataModule("digits", val_fraction=fraction)


def test_a_fraction_that_empties_a_class_on_either_side_is_refused(fake_cifar10):
    labels = torch.tensor([0] * 50 + [1] * 2)
    with pytest.raises(ValueError, match="leaves class 1 .* with no validation sample"):
        held_out_split(labels, 0.1, seed=0)
    with pytest.raises(ValueError, match="leaves class 1 .* with no train sample"):
        held_out_split(torch.tensor([0, 0, 1]), 0.6, seed=0)
    with pytest.raises(ValueError, match="holds out 0 of the 100 train samples"):
        UEDataModule("cifar10", root=str(fake_cifar10), val_fraction=0.001).setup("fit")


def test_partial_protection_and_drop_protected_apply_to_the_rest(fake_cifar10, tmp_path):
    kwargs = dict(root=str(fake_cifar10), augment=False, val_fraction=0.2, protected_fraction=0.5)
    dm = UEDataModule("cifar10", **kwargs)
    dm.perturbation = _noise(dm, tmp_path / "n.safetensors")
    dm.setup("fit")
    train = dm.clean_split("train")
    moved = sum(int(((x * 255).round() != train.images[index]).flatten(1).any(1).sum())
                for x, _, index in dm.train_dataloader())
    assert moved == 40  # half of the 80 left for training
    dropped = UEDataModule("cifar10", drop_protected=True, **kwargs)
    assert len(dropped.victim_indices()) == 40
    assert not set(dropped.victim_indices().tolist()) & set(dropped.val_indices().tolist())


def test_victim_logs_val_acc_only_with_a_split():
    from ue_lightning.modules import VictimClassifier

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a one-batch fit; two threads only wait on each other on a shared machine
    try:
        for fraction, logged in ((0.1, True), (0.0, False)):
            dm = UEDataModule("digits", val_fraction=fraction, batch_size=16, eval_batch_size=256)
            model = VictimClassifier(arch="resnet18", width=4, num_classes=10, in_channels=1, image_size=8)
            trainer = L.Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=1, logger=False,
                                enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
            trainer.fit(model, datamodule=dm)
            assert ("val/acc" in trainer.callback_metrics) is logged
    finally:
        torch.set_num_threads(threads)


def test_ddp_shards_the_val_set(fake_cifar10):
    from torch.utils.data import DistributedSampler
    from lightning.pytorch.trainer.states import RunningStage

    dm = UEDataModule("cifar10", root=str(fake_cifar10), val_fraction=0.2, eval_batch_size=4)
    dm.setup("fit")
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False)
    loader = trainer._data_connector._prepare_dataloader(dm.val_dataloader(), shuffle=False,
                                                         mode=RunningStage.VALIDATING)
    assert isinstance(loader.sampler, DistributedSampler) and loader.sampler.num_replicas == 2
    assert len(list(loader.sampler)) == 10 and not loader.sampler.shuffle  # rank 0's half of the 20, in order
