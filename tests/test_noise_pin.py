"""The noise a generator makes for a given seed is pinned: refactors of how noise is stored must not change it.

The checksums were recorded from the code before the noise store (commit 6ebae0a): a tiny
EM fit (sample-wise and class-wise) and a tiny TUE fit on the digits, one CPU thread, then
``ue predict``'s noise file. A change of algorithm that moves them must say so and re-pin.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from ue_lightning.callbacks import PerturbationWriter
from ue_lightning.data import NoiseFile, UEDataModule
from ue_lightning.modules import ErrorMinimizingNoise, TransferableNoise

EXPECTED = {  # (noise state, noise file), each the first 16 hex digits of a sha256
    "em-samplewise": ("c261e4126196cbd4", "41f7086d6e3634a9"),
    "em-classwise": ("05b4c5795998a52b", "6ba95806eb33a905"),
    "tue": ("ac1a2a756dd138fa", "c98ad864c87845f7"),
}


def _sha(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()[:16]


def _trainer(root: Path, **kw) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, inference_mode=False,
                     default_root_dir=root, **kw)


def _generator(name: str, store: str) -> tuple[L.LightningModule, UEDataModule, dict]:
    dm = UEDataModule("digits", batch_size=8, eval_batch_size=16, train_subset=40, augment=False)
    if name == "tue":
        module = TransferableNoise(num_classes=10, in_channels=1, image_size=8, width=4, steps=2, train_steps=2,
                                   noise_batch_size=16, crop_scale=(0.5, 1.0), flip_p=0.0, ssl_weight=1.0,
                                   csd_weight=1.0, noise_store=store)
        return module, dm, dict(max_epochs=1)
    module = ErrorMinimizingNoise(arch="resnet18", width=4, in_channels=1, image_size=8, num_classes=10,
                                  mode=name.split("-")[1], eot_padding=1, eot_flip=False, train_steps=3,
                                  max_rounds=2, steps=4, classwise_subset=0.5, eot_samples=1, noise_batch_size=12,
                                  noise_store=store)
    return module, dm, dict(max_epochs=-1)


CASES = [("em-samplewise", "memory"), ("em-samplewise", "file"), ("em-classwise", "memory"), ("tue", "memory"),
         ("tue", "file")]


@pytest.mark.parametrize("name,store", CASES)
def test_noise_for_a_seed_is_unchanged(name, store, tmp_path):
    """The same noise in memory and in a memory-mapped file, and after a checkpoint round trip."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the pinned sums are of one-thread runs
    try:
        _fit_and_check(name, store, tmp_path)
    finally:
        torch.set_num_threads(threads)


def _fit_and_check(name: str, store: str, tmp_path: Path) -> None:
    L.seed_everything(0)
    module, dm, kw = _generator(name, store)
    trainer = _trainer(tmp_path, **kw)
    trainer.fit(module, datamodule=dm)
    assert module._store.kind == ("memory" if name == "em-classwise" else store)
    state = _sha(np.asarray(module.noise))
    ckpt = tmp_path / "generator.ckpt"
    trainer.save_checkpoint(ckpt)
    output = tmp_path / "noise.safetensors"
    fresh, dm, _ = _generator(name, store)  # `ue predict --ckpt_path`: the noise comes from the checkpoint
    _trainer(tmp_path, callbacks=[PerturbationWriter(str(output))]).predict(fresh, datamodule=dm, ckpt_path=ckpt,
                                                                           return_predictions=False)
    assert _sha(np.asarray(fresh.noise)) == state
    written = _sha(np.asarray(NoiseFile.open(output).delta))
    assert (state, written) == EXPECTED[name]
    assert not list(tmp_path.glob(".noise-store*"))  # the store's file was unlinked once mapped
