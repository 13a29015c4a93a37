"""The `clean | noise | protected` grid: its layout, and every generator's predict logging it to TensorBoard only."""

from __future__ import annotations

from unittest.mock import MagicMock

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from ue_lightning.callbacks import GRID_TAG
from ue_lightning.data import UEDataModule
from ue_lightning.pictures import PADDING, noise_picture, perturbation_grid
from ue_lightning.modules import RandomNoise


def test_a_row_per_image_of_any_size_and_channels():
    clean = [torch.full((1, 8, 8), 100, dtype=torch.uint8), torch.randint(0, 256, (3, 53, 37), dtype=torch.uint8)]
    delta = [torch.zeros(1, 8, 8, dtype=torch.int8), torch.full((3, 53, 37), -8, dtype=torch.int8)]
    grid = perturbation_grid(clean, delta, epsilon=8, box=40)
    assert grid.dtype == torch.uint8 and grid.shape == (3, 2 * 40 + 3 * PADDING, 3 * 40 + 4 * PADDING)
    first_noise = grid[:, PADDING:PADDING + 40, 2 * PADDING + 40:2 * PADDING + 80]
    assert set(first_noise.unique().tolist()) == {128}, "zero noise is mid-grey"
    assert noise_picture(torch.tensor([-8, 0, 8], dtype=torch.int8), 8).tolist() == [0, 128, 255]


def _predict(tmp_path, loggers) -> None:
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=loggers, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=str(tmp_path), inference_mode=False)
    dm = UEDataModule("digits", batch_size=256, train_subset=300)
    trainer.predict(RandomNoise(num_classes=10, in_channels=1, image_size=8, epsilon=8), datamodule=dm,
                    return_predictions=False)


def test_predict_logs_the_grid_to_tensorboard(tmp_path):
    board = MagicMock(spec=TensorBoardLogger)  # isinstance(board, TensorBoardLogger) holds; nothing is written
    board.name, board.version, board.save_dir, board.log_dir = "tb", 0, str(tmp_path), str(tmp_path)
    _predict(tmp_path, [CSVLogger(tmp_path), board])
    (tag, grid), kwargs = board.experiment.add_image.call_args
    assert board.experiment.add_image.call_count == 1 and tag == GRID_TAG and kwargs == {"global_step": 0}
    assert grid.dtype == torch.uint8 and grid.shape[0] == 3 and grid.shape[1] > grid.shape[2]  # 8 rows of 3


def test_predict_without_tensorboard_logs_no_grid(tmp_path, monkeypatch):
    import ue_lightning.callbacks as callbacks

    built = MagicMock(side_effect=perturbation_grid)
    monkeypatch.setattr(callbacks, "perturbation_grid", built)
    _predict(tmp_path, [CSVLogger(tmp_path)])
    _predict(tmp_path, False)
    assert built.call_count == 0  # no grid is even drawn without a TensorBoard logger
    assert not list(tmp_path.rglob("events.out.tfevents*")) and not list(tmp_path.rglob("*.png"))
    board = MagicMock(spec=TensorBoardLogger)  # the control: with one, the same run draws it once
    board.name, board.version, board.save_dir, board.log_dir = "tb", 0, str(tmp_path), str(tmp_path)
    _predict(tmp_path, [CSVLogger(tmp_path), board])
    assert built.call_count == 1


def test_the_grid_reaches_a_real_tensorboard_event_file(tmp_path):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    board = TensorBoardLogger(tmp_path)
    _predict(tmp_path, board)
    events = event_accumulator.EventAccumulator(board.log_dir)
    events.Reload()
    (image,) = events.Images(GRID_TAG)
    assert image.width == 3 * 160 + 4 * PADDING and image.height == 8 * 160 + 9 * PADDING
