"""`ue predict` of a RobustNoiseGenerator under 2-process DDP (gloo, CPU) writes the one-process noise file."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from conftest import config_args, run_ue, shipped
from ue_lightning.data import UEDataModule
from ue_lightning.data.noise_file import NoiseFile

CONFIG = config_args(*shipped("digits", "generator/rem"))
NOISE = Path("runs/noise/rem-digits.safetensors")
CKPT = "runs/generator/rem-digits/checkpoints/last.ckpt"
# 63 samples: 2 ranks x batch 8 = 16 does not divide 63, so DistributedSampler pads rank 1 with a duplicate,
# and the per-rank batches (every other sample) differ from the one-process batches.
TINY = [*CONFIG, "--data.train_subset", "63", "--data.batch_size", "16", "--data.eval_batch_size", "8",
        "--model.init_args.width", "4", "--model.init_args.steps", "2", "--model.init_args.adv_steps", "2",
        "--model.init_args.eot_samples", "2", "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false"]
ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # tiny models: threads only contend on a shared 2-core machine


def test_ddp_predict_writes_the_same_noise_as_one_process(tmp_path: Path) -> None:
    run_ue("fit", *TINY, "--trainer.max_steps", "3", cwd=tmp_path, env=ONE_THREAD)
    assert (tmp_path / CKPT).is_file()
    assert not (tmp_path / NOISE).exists()  # the PerturbationWriter in the config does nothing during fit

    run_ue("predict", *TINY, "--ckpt_path", CKPT, cwd=tmp_path, env=ONE_THREAD)
    single = tmp_path / "single.safetensors"
    (tmp_path / NOISE).rename(single)
    run_ue("predict", *TINY, "--ckpt_path", CKPT, "--trainer.accelerator", "cpu", "--trainer.devices", "2",
           "--trainer.strategy", "ddp", cwd=tmp_path, env=ONE_THREAD)

    one, two = NoiseFile.open(single), NoiseFile.open(tmp_path / NOISE)
    expected = UEDataModule("digits", train_subset=63).train_indices().numpy()
    for noise in (one, two):
        assert noise.metadata.method == "rem" and noise.metadata.epsilon == 64
        assert np.array_equal(np.asarray(noise.covered).nonzero()[0], expected)  # every index, exactly these
        assert np.abs(np.asarray(noise.delta)[expected]).max() <= 64
    delta_one, delta_two = np.asarray(one.delta), np.asarray(two.delta)
    differ = np.argwhere(delta_one != delta_two)
    assert len(differ) == 0, f"{len(differ)} of {delta_one[expected].size} values differ, e.g. at {differ[:5].tolist()}"
    assert np.abs(delta_one[expected]).sum() > 0
