"""Screen the budget of ``ue protect``'s quick robust generator: fit it on the quick path's training crops and log
the surrogate's train-mode accuracy on its own adversarial batches (``train/acc``) and on the clean crops
(``train/clean_acc``) every 5 steps, to a CSV under ``--out``; the checkpoint is ``--out``/surrogate.ckpt (pass it
to ``ue protect --method rem --checkpoint``). A noise that becomes a shortcut shows as the two accuracies parting.

    OMP_NUM_THREADS=1 python benchmarks/robust_budget.py --photos ../shared/data/tiny-imagenet-10/train \\
        --out runs/rem300 --steps 300 --lr_decay 200 --alpha 4
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import lightning as L
import numpy as np
from lightning.pytorch.loggers import CSVLogger

from ue_lightning.data import UEDataModule
from ue_lightning.modules import RobustNoiseGenerator
from ue_lightning.protect.images import find_images
from ue_lightning.protect.quick import WIDTH, training_images


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--photos", required=True, help="class folders of photos, as ue protect reads them")
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=300, help="SGD steps of the surrogate")
    p.add_argument("--noise_steps", type=int, default=4)
    p.add_argument("--alpha", type=float, default=4.0, help="noise step, 1/255 units")
    p.add_argument("--epsilon", type=float, default=8.0)
    p.add_argument("--eot", type=int, default=1)
    p.add_argument("--adv_steps", type=int, default=1)
    p.add_argument("--adv_radius", type=float, default=4.0)
    p.add_argument("--lr_decay", type=int, default=200)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--score", default=None, help="a ScoreEstimator checkpoint: collapse instead of REM")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    jobs, _ = find_images(Path(a.photos), out / "none")
    classes = sorted({j.class_name for j in jobs})
    images, labels = training_images(jobs, classes, "samplewise", a.seed)
    nhwc = images.permute(0, 2, 3, 1).numpy()
    np.savez(out / "images.npz", x_train=nhwc, y_train=labels, x_test=nhwc[:1], y_test=labels[:1])
    adv_step = a.adv_radius if a.adv_steps == 1 else a.adv_radius / 4
    generator = RobustNoiseGenerator(num_classes=len(classes), in_channels=3, image_size=images.shape[-1], width=WIDTH,
                                     epsilon=a.epsilon, step_size=a.alpha, steps=a.noise_steps, adv_radius=a.adv_radius,
                                     adv_step_size=adv_step, adv_steps=a.adv_steps, eot_samples=a.eot,
                                     lr_decay_steps=a.lr_decay, seed=a.seed, score_checkpoint=a.score)
    data = UEDataModule("npz", root=str(out / "images.npz"), batch_size=a.batch, augment=False, seed=a.seed)
    start = time.time()
    trainer = L.Trainer(max_epochs=-1, max_steps=a.steps, accelerator="cpu", devices=1, log_every_n_steps=5,
                        logger=CSVLogger(out, name="log"), enable_checkpointing=False, enable_progress_bar=False,
                        default_root_dir=str(out), inference_mode=False)
    trainer.fit(generator, datamodule=data)
    trainer.save_checkpoint(out / "surrogate.ckpt")
    print(f"fit {time.time() - start:.0f} s on {len(images)} crops; per-step accuracies: {out}/log/*/metrics.csv")


if __name__ == "__main__":
    main()
