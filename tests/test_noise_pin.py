"""The noise a generator makes for a given seed is pinned: refactors of how noise is stored must not change it.

Two guards. Machine-independent: in one process, the in-memory and the memory-mapped file store make the same
noise, which survives a checkpoint round trip and ``ue predict``'s noise file. Pinned: the first 16 hex digits
of the noise's sha256 for a tiny EM fit (sample-wise and class-wise) and a tiny TUE fit on the digits.

EM's noise is a sign-gradient PGD over a trained surrogate: one float rounding that flips one sign moves every
later step, and which rounding happens depends on the processor (oneDNN and ATen pick AVX2/AVX-512/FMA kernels
by CPU; MKL's GEMM too), so the same code made different EM noise on two machines of the same kind (issue
30). The pinned fits therefore run in a subprocess with portable arithmetic (:data:`PORTABLE`): ATen's
non-vectorised kernels, oneDNN and NNPACK off, MKL's conditional numerical reproducibility at its
``COMPATIBLE`` level, one thread. The same pins came out on an AMD EPYC (AVX2, FMA) and, under qemu-user, on
an emulated Intel Nehalem (SSE4.2: no AVX, no FMA) and Haswell (AVX2, FMA) (benchmarks/RESULTS.md, "Pinned
noise across processors"). A change of algorithm that moves
the pins must say so and re-pin (``python tests/test_noise_pin.py`` prints them).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from conftest import cpu_trainer
from ue_lightning.callbacks import PerturbationWriter
from ue_lightning.data import NoiseFile, UEDataModule
from ue_lightning.modules import ErrorMinimizingNoise, TransferableNoise

# read by torch when it is imported: set in the subprocess's environment, never in this one
PORTABLE = {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE", "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1", "UE_PORTABLE_ARITHMETIC": "1"}

#: The torch release the pins were made with. Another release may compute a float op another way (a kernel, a
#: reduction order) and move EM's noise as another processor does: the pinned test then says so and skips, and
#: the machine-independent one still runs. pyproject.toml accepts a range of releases; CI takes this one.
PINNED_TORCH = "2.14.1"
EXPECTED = {  # (noise state, noise file), each the first 16 hex digits of a sha256
    "em-samplewise": ("5f05872377fc8560", "246433f6a7e2c90c"),
    "em-classwise": ("0543852b70773bae", "d8289ab61baaa091"),
    "tue": ("ac1a2a756dd138fa", "c98ad864c87845f7"),
}


def _sha(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()[:16]


def _trainer(root: Path, **kw) -> L.Trainer:
    return cpu_trainer(root, **kw)


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


def _fit(name: str, store: str, root: Path) -> tuple[str, str]:
    """Fit, checkpoint, predict from the checkpoint: ``(sha of the noise state, sha of the written file)``."""
    L.seed_everything(0, verbose=False)
    module, dm, kw = _generator(name, store)
    trainer = _trainer(root, **kw)
    trainer.fit(module, datamodule=dm)
    assert module._store.kind == ("memory" if name == "em-classwise" else store)
    state = _sha(np.asarray(module.noise))
    ckpt = root / f"{name}-{store}.ckpt"
    trainer.save_checkpoint(ckpt)
    output = root / f"{name}-{store}.safetensors"
    fresh, dm, _ = _generator(name, store)  # `ue predict --ckpt_path`: the noise comes from the checkpoint
    _trainer(root, callbacks=[PerturbationWriter(str(output))]).predict(fresh, datamodule=dm, ckpt_path=ckpt,
                                                                       return_predictions=False)
    assert _sha(np.asarray(fresh.noise)) == state
    assert not list(root.glob(".noise-store*"))  # the store's file was unlinked once mapped
    return state, _sha(np.asarray(NoiseFile.open(output).delta))


@pytest.mark.parametrize("name", ["em-samplewise", "tue"])
def test_memory_and_file_stores_make_the_same_noise(name, tmp_path):
    """On any processor and thread count: the file store's noise equals the memory store's, bit for bit, and
    so does the noise read back from the checkpoint and from the written file."""
    state, written = _fit(name, "memory", tmp_path)
    assert _fit(name, "file", tmp_path) == (state, written)


@pytest.fixture(scope="module")
def pinned_run(tmp_path_factory) -> dict:
    """This file run as a script in a subprocess with portable arithmetic: ``{case: [state sha, file sha]}``."""
    if torch.__version__.split("+")[0] != PINNED_TORCH:
        pytest.skip(f"the pins were made with torch {PINNED_TORCH}, this is {torch.__version__}: re-pin with "
                    "`python tests/test_noise_pin.py` if this release is to be the reference")
    root = tmp_path_factory.mktemp("pins")
    proc = subprocess.run([sys.executable, __file__, str(root)], env={**os.environ, **PORTABLE},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


CASES = [("em-samplewise", "memory"), ("em-samplewise", "file"), ("em-classwise", "memory"), ("tue", "memory"),
         ("tue", "file")]


@pytest.mark.parametrize("name,store", CASES)
def test_noise_for_a_seed_is_unchanged(name, store, pinned_run):
    assert tuple(pinned_run[f"{name}-{store}"]) == EXPECTED[name]


def _portable_arithmetic() -> None:
    """What :data:`PORTABLE`'s variables cannot switch: oneDNN's and NNPACK's CPU-dispatched convolutions."""
    assert os.environ.get("UE_PORTABLE_ARITHMETIC") == "1", "run with the PORTABLE environment"
    assert torch.backends.cpu.get_cpu_capability() == "DEFAULT", "ATEN_CPU_CAPABILITY=default was not read"
    torch.backends.mkldnn.enabled = False
    torch.backends.nnpack.enabled = False
    torch.set_num_threads(1)


if __name__ == "__main__":  # python tests/test_noise_pin.py [DIR]: the pins, with portable arithmetic
    if os.environ.get("UE_PORTABLE_ARITHMETIC") != "1":  # re-run with the portable environment
        sys.exit(subprocess.run([sys.executable, __file__, *sys.argv[1:]], env={**os.environ, **PORTABLE}).returncode)
    import tempfile

    _portable_arithmetic()
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(scratch)
        print(json.dumps({f"{n}-{s}": _fit(n, s, root) for n, s in CASES}))
