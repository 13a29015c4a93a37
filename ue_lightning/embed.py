"""``ue embed``: where a victim puts each class of clean and of protected train images, as a 2-D picture.

Fang et al.'s Fig. 2 shows t-SNE maps of features of clean, REM and data-collapse images: collapse draws each
class into a tight cluster. ``ue embed`` makes that picture for any victim checkpoint and noise files: the
penultimate features (``forward_features``) of the same seeded, class-stratified train samples, clean and as
each noise file protects them, one t-SNE map fitted on all of them together (so the panels share axes), a
panel per data with a colour per class, and, as in the paper's figure, one panel of them all with a colour per
data. Written: the PNG, a JSON of the per-class spread, and the figure plus the
raw features (TensorBoard's projector) under ``<output>.tensorboard/``.

The spread is measured in feature space, not on the map (t-SNE distorts distances): for each data,
``within / between``, the mean squared distance of a sample to its class mean over that of the class means
to their grand mean. A class that collapses has a small ``within``; noise that separates classes (the
shortcut a victim learns) makes ``within / between`` small.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import Tensor

from ue_lightning.data import UEDataModule, stratified_subset
from ue_lightning.models.checkpoint import check_data_facts, read_classifier_checkpoint
from ue_lightning.models.registry import classifier_from_weights
from ue_lightning.scratch import atomic_write_json

_FIX = "pass the last.ckpt of a victim (`ue fit ... --config configs/victim/<arch>.yaml`) trained on this data"


def spread(features: Tensor, labels: Tensor) -> dict[str, float]:
    """``{"within", "between", "ratio"}``: mean squared distance of a sample (rows of ``features`` (N, D)) to its
    class mean, of the class means to their mean, and within / between (small: tight, separate classes)."""
    means = torch.stack([features[labels == k].mean(0) for k in labels.unique()])
    within = torch.cat([(features[labels == k] - m).pow(2).sum(1) for k, m in zip(labels.unique(), means)]).mean()
    between = (means - means.mean(0)).pow(2).sum(1).mean()
    return {"within": float(within), "between": float(between), "ratio": float(within / between)}


def victim_features(model: torch.nn.Module, images: Tensor, batch_size: int = 256) -> Tensor:
    """float (N, D): ``model.forward_features`` of float images (N, C, H, W) in [0, 1], eval mode, no gradients."""
    model.eval()
    with torch.no_grad():
        return torch.cat([model.forward_features(images[i:i + batch_size]) for i in range(0, len(images), batch_size)])


def read_data_section(path: str) -> dict[str, Any]:
    """The ``data:`` section of a data config YAML (e.g. ``configs/data/cifar10.yaml``)."""
    config = Path(path)
    if not config.is_file():
        raise FileNotFoundError(f"--data {path} does not exist: pass a data config, e.g. configs/data/digits.yaml")
    section = (yaml.safe_load(config.read_text()) or {}).get("data")
    if not isinstance(section, dict):
        raise ValueError(f"--data {path} has no `data:` section: pass a data config, e.g. configs/data/digits.yaml")
    return {k: v for k, v in section.items() if k not in ("perturbation", "defence", "purify_with")}


def embed_features(
    checkpoint: str,
    data: str,
    noise: list[str] = [],
    output: str = "embedding.png",
    per_class: int = 50,
    perplexity: float = 30.0,
    seed: int = 0,
) -> dict[str, Any]:
    """Draw a victim's features of clean and protected train images on one t-SNE map (Fang et al., Fig. 2).

    Args:
        checkpoint: a VictimClassifier ``last.ckpt`` trained on this data (clean or protected).
        data: a data config YAML (its ``data:`` section; noise, defences and purification are left out).
        noise: ``name=path`` noise files of this data, each a panel beside the clean one (e.g.
            ``rem=runs/noise/rem-cifar10.safetensors``).
        output: the PNG to write; ``<output>.json`` gets the spread of each panel and
            ``<output>.tensorboard/`` the figure and the features.
        per_class: train samples of each class (seeded, class-stratified; the same ones in every panel).
        perplexity: t-SNE's (capped at a third of the samples less one).
        seed: of the samples and of t-SNE.
    """
    from sklearn.manifold import TSNE

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("ue embed draws with matplotlib: pip install 'ue_lightning[grid]'") from None
    if per_class < 1:
        raise ValueError(f"--per_class {per_class} must be at least 1 (train samples drawn from each class)")
    if perplexity <= 0:
        raise ValueError(f"--perplexity {perplexity} must be positive (t-SNE's usual range is 5 to 50)")
    sets = {"clean": None}
    for spec in noise:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path or name in sets:
            raise ValueError(f"--noise {spec!r}: give each noise file as name=path, with a name of its own")
        if not Path(path).is_file():
            raise FileNotFoundError(f"--noise {spec}: no file {path}: write it with `ue predict` first")
        sets[name] = path
    section = read_data_section(data)
    clean = UEDataModule(**section)
    hp, weights = read_classifier_checkpoint(checkpoint, name="--checkpoint",
                                             expected="ue_lightning.modules.VictimClassifier", fix=_FIX)
    check_data_facts(hp, {"num_classes": clean.num_classes, "in_channels": clean.in_channels,
                          "image_size": clean.image_size}, name=f"--checkpoint {checkpoint}", fix=_FIX)
    model = classifier_from_weights(hp, weights, name=f"--checkpoint {checkpoint}")
    labels_all = clean.clean_split("train").targets[clean.train_indices()]
    count = min(per_class * clean.num_classes, len(labels_all))
    chosen = stratified_subset(labels_all, count, seed).tolist()
    features, labels, spreads = [], None, {}
    for name, path in sets.items():
        if path is None:
            samples = clean.train_images()
        else:  # the train images as the noise file protects them (needs the DataModule set up with it)
            protected = UEDataModule(**section, perturbation=path)
            protected.setup("fit")
            samples = protected.train_images(noised=True)
        batch = [samples[i] for i in chosen]
        images = torch.stack([b[0] for b in batch])
        labels = torch.tensor([b[1] for b in batch])
        f = victim_features(model, images)
        features.append(f)
        spreads[name] = spread(f, labels)
    stacked = torch.cat(features).numpy()
    tsne = TSNE(n_components=2, perplexity=min(perplexity, (len(stacked) - 1) / 3), init="pca", random_state=seed)
    points = np.split(tsne.fit_transform(stacked), len(sets))

    panels = len(sets) + (len(sets) > 1)
    figure, axes = plt.subplots(1, panels, figsize=(4 * panels, 4), squeeze=False)
    colours = plt.get_cmap("tab10" if clean.num_classes <= 10 else "tab20")
    for ax, (name, xy) in zip(axes[0], zip(sets, points)):
        ax.scatter(xy[:, 0], xy[:, 1], c=[colours(int(y) % colours.N) for y in labels], s=6)
        ax.set_title(f"{name} (within/between {spreads[name]['ratio']:.2f})")
    if len(sets) > 1:  # the paper's figure: every data in one panel, a colour per data
        together = axes[0][-1]
        palette = ("tab:green", "tab:red", "tab:blue", "tab:orange", "tab:purple", "tab:brown", "tab:grey")
        for i, (name, xy) in enumerate(zip(sets, points)):  # colours repeat past 7 data, no panel is dropped
            together.scatter(xy[:, 0], xy[:, 1], color=palette[i % len(palette)], s=6, label=name)
        together.legend(fontsize=8)
        together.set_title("together, a colour per data")
    for ax in axes[0]:
        ax.set_xticks([]), ax.set_yticks([])
    figure.suptitle(f"{Path(checkpoint).name}: t-SNE of its features, {count} train samples, colour = class")
    figure.tight_layout()
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=120)

    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(log_dir=str(out.with_suffix(".tensorboard"))) as writer:
        writer.add_figure("embedding", figure)
        for name, f in zip(sets, features):
            writer.add_embedding(f, metadata=labels.tolist(), tag=name)
    plt.close(figure)
    report = {"checkpoint": str(checkpoint), "samples": count, "seed": seed, "spread": spreads,
              "noise": {k: v for k, v in sets.items() if v is not None}}
    atomic_write_json(out.with_suffix(".json"), report)
    print(f"wrote {out} and {out.with_suffix('.json')}: within/between "
          + ", ".join(f"{k} {v['ratio']:.2f}" for k, v in spreads.items()))
    return report
