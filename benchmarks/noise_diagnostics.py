"""Diagnose a robust generator's final noise on the CPU protocol's subset (REM, data collapse).

    python benchmarks/noise_diagnostics.py report CKPT NOISE_FILE    # what the noise holds, what the surrogate sees
    python benchmarks/noise_diagnostics.py variant CKPT OUT.ckpt step_size=3.2 [score_step_size=3.2 ...]

``report`` prints, for the 5000 images of the protocol's subset (``data.train_subset 5000``,
``data.seed 0`` of ``../shared/data/cifar10-jpeg75-subset.npz``):

- the mean |delta| (1/255) and the share of pixels at the bound;
- how much of the final pass's random start is left in the noise: the correlation between
  the start :meth:`RobustNoiseGenerator.defend` drew for each sample (``salt_of("final",
  "start")``, the checkpoint's seed) and the stored noise, and how often their signs agree
  (0 and 50% when the start is gone);
- the surrogate of CKPT (BatchNorm in eval mode) on the protected images under two fresh
  crop/flip draws (padding 4), as the victim will see them, and on the clean images:
  accuracy and cross-entropy. Pass ``clean`` as NOISE_FILE for the clean images alone.

``variant`` writes a copy of the checkpoint with some hyperparameters changed, so that ``ue
predict --ckpt_path OUT.ckpt`` runs the final pass with them (``--ckpt_path`` brings the
checkpoint's own settings, which win over the config's; see ``ue_lightning.lightning_cli``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SHARED_NPZ  # noqa: E402

from ue_lightning.ops.augment import random_crop_flip  # noqa: E402
from ue_lightning.data.sampling import stratified_subset  # noqa: E402
from ue_lightning.data.noise_file import NoiseFile  # noqa: E402
from ue_lightning.modules.robust import RobustNoiseGenerator  # noqa: E402
from ue_lightning.ops.sample_rng import salt_of  # noqa: E402

SUBSET, SEED = 5000, 0


def load_surrogate(ckpt: str) -> RobustNoiseGenerator:
    """The generator of CKPT without its score model (only the surrogate is needed), in eval mode."""
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    hparams = {k: v for k, v in state["hyper_parameters"].items() if not k.startswith("_")}
    hparams.update(score_checkpoint=None, score_step_size=None)
    generator = RobustNoiseGenerator(**hparams)
    generator.load_state_dict(state["state_dict"])
    return generator.eval()


def report(ckpt: str, noise: str) -> None:
    generator = load_surrogate(ckpt)
    with np.load(SHARED_NPZ) as f:
        labels = torch.as_tensor(f["y_train"])
        index = stratified_subset(labels, SUBSET, SEED)
        x = torch.as_tensor(f["x_train"][index.numpy()]).permute(0, 3, 1, 2).float()  # 0-255
    y = labels[index]
    if noise != "clean":
        delta = NoiseFile.open(noise).delta_for(index, y).float()  # 1/255 units
        eps = generator.hparams.epsilon
        start = 255 * generator.uniform_box(index, x / 255, generator.radius_px, salt_of("final", "start"))
        corr = torch.corrcoef(torch.stack([start.flatten(), delta.flatten()]))[0, 1]
        print(f"mean |delta| {delta.abs().mean():.2f}/255, {100 * (delta.abs() >= eps - 0.5).float().mean():.0f}% "
              f"at the bound; random start left: correlation {corr:.2f}, "
              f"signs agree {100 * (start.sign() == delta.sign()).float().mean():.0f}%")
        x = x + delta
    images = x.clamp(0, 255) / 255
    correct, loss = 0.0, 0.0
    with torch.no_grad():
        for draw in range(2):
            for i in range(0, SUBSET, 500):
                batch = random_crop_flip(images[i:i + 500], 4, True, index=index[i:i + 500], seed=123, salt=draw)
                logits = generator.model(batch)
                correct += (logits.argmax(1) == y[i:i + 500]).sum().item()
                loss += F.cross_entropy(logits, y[i:i + 500], reduction="sum").item()
    print(f"surrogate on {'clean' if noise == 'clean' else 'protected'} images, 2 crop/flip draws: "
          f"accuracy {correct / (2 * SUBSET):.3f}, cross-entropy {loss / (2 * SUBSET):.3f}")


def variant(ckpt: str, out: str, settings: list[str]) -> None:
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    for setting in settings:
        key, _, value = setting.partition("=")
        if key not in state["hyper_parameters"]:
            raise SystemExit(f"{key}: not a hyperparameter of {ckpt}")
        state["hyper_parameters"][key] = yaml.safe_load(value)  # 3.2 -> float, false -> bool, null -> None
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, out)
    print(f"wrote {out}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("report")
    r.add_argument("ckpt")
    r.add_argument("noise")
    v = sub.add_parser("variant")
    v.add_argument("ckpt")
    v.add_argument("out")
    v.add_argument("settings", nargs="+", help="KEY=VALUE")
    a = p.parse_args()
    torch.set_num_threads(1)
    report(a.ckpt, a.noise) if a.command == "report" else variant(a.ckpt, a.out, a.settings)


if __name__ == "__main__":
    main()
