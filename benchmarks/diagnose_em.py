"""Diagnostic: a minimal sample-wise EM loop and a victim, outside Lightning, on the CPU subset.

Used to find why the package's EM noise was not learned by a fresh network (see
docs/methods.md, "Error-minimising noise"). Each variant differs from the package's loop in one setting:

    python benchmarks/diagnose_em.py --pass-mode eval --stop train --out /tmp/em-eval.pt

It prints, per round, the surrogate's train-mode accuracy on the perturbed batches it
trained on, its eval-mode accuracy on the perturbed set after the pass, and its
train-mode accuracy on the clean set; then trains a victim (ResNet-18 width 16,
crop+flip, 15 epochs, cosine SGD) on the noise and prints its train and test accuracy.
CPU scale, real CIFAR-10 (JPEG q75 copy): not the published setting.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ue_lightning.ops.attacks import cross_entropy_sum, pgd_minimize
from ue_lightning.ops.augment import random_crop_flip
from ue_lightning.data import NoiseFile
from ue_lightning.data.sampling import stratified_subset
from ue_lightning.models import build_classifier

NPZ = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg75-subset.npz"


def load(n: int, seed: int = 0, noise: str | None = None):
    """Train subset (as UEDataModule(train_subset=n, seed=seed) picks it), optionally protected by a noise file."""
    d = np.load(NPZ)
    y = torch.from_numpy(d["y_train"]).long()
    keep = stratified_subset(y, n, seed)
    x = torch.from_numpy(d["x_train"][keep.numpy()]).permute(0, 3, 1, 2)
    if noise is not None:
        delta = torch.from_numpy(np.asarray(NoiseFile.open(noise).delta)[keep.numpy()])
        x = (x.short() + delta.short()).clamp(0, 255).to(torch.uint8)
    x = x.float() / 255
    xt = torch.from_numpy(d["x_test"]).permute(0, 3, 1, 2).float() / 255
    return x, y[keep], xt, torch.from_numpy(d["y_test"]).long()


def accuracy(model, x, y, train_mode=False, bs=500):
    model.train(train_mode)
    with torch.no_grad():
        hits = sum((model(x[i:i + bs]).argmax(1) == y[i:i + bs]).sum().item() for i in range(0, len(x), bs))
    return hits / len(x)


def em(x, y, args):
    torch.manual_seed(args.seed)
    model = build_classifier("resnet18", 10, width=args.width)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    delta = torch.zeros_like(x)
    eps, step = args.eps / 255, args.step / 255
    g = torch.Generator().manual_seed(args.seed)
    order, pos = torch.randperm(len(x), generator=g), 0
    for rnd in range(1, args.max_rounds + 1):
        t0 = time.time()
        model.train()
        hits = seen = 0
        for _ in range(args.train_steps):
            if pos + args.batch > len(x):
                order, pos = torch.randperm(len(x), generator=g), 0
            b = order[pos:pos + args.batch]
            pos += args.batch
            xb = (x[b] + delta[b]).clamp(0, 1)
            logits = model(random_crop_flip(xb, 4) if args.surrogate_augment else xb)
            loss = F.cross_entropy(logits, y[b])
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            opt.step()
            hits += (logits.argmax(1) == y[b]).sum().item()
            seen += len(b)
        train_acc = hits / seen
        if args.stop == "train" and train_acc >= args.stop_acc:
            print(f"round {rnd}: surrogate train-mode acc {train_acc:.3f} on its batches -> stop", flush=True)
            break
        model.train(args.pass_mode == "train")
        for i in range(0, len(x), args.pass_batch):
            sl = slice(i, i + args.pass_batch)
            loss = cross_entropy_sum(model, y[sl])
            if args.eot:  # expectation over crop/flip draws: a fresh draw at every PGD step
                ce = loss
                loss = lambda xp: sum(ce(random_crop_flip(xp, 4)) for _ in range(args.eot))  # noqa: E731
            delta[sl] = pgd_minimize(loss, x[sl], radius=eps, step_size=step, steps=args.steps, init=delta[sl])
        eval_acc = accuracy(model, (x + delta).clamp(0, 1), y)
        clean_eval = accuracy(model, x, y)
        print(f"round {rnd}: train-mode acc on its batches {train_acc:.3f}, eval acc on noise {eval_acc:.3f}, "
              f"eval acc clean {clean_eval:.3f}, |delta| {delta.abs().mean() * 255:.2f}/255 "
              f"({time.time() - t0:.0f} s)", flush=True)
        if args.stop == "eval" and eval_acc >= args.stop_acc:
            break
    return ((x + delta).clamp(0, 1) * 255).round() / 255  # the uint8 grid, as a noise file would be


def victim(x, y, xt, yt, args):
    torch.manual_seed(args.victim_seed)
    model = build_classifier("resnet18", 10, width=16)
    epochs, bs = args.victim_epochs, 128
    steps = epochs * math.ceil(len(x) / bs)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=False)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    g = torch.Generator().manual_seed(args.victim_seed)
    for ep in range(epochs):
        model.train()
        perm = torch.randperm(len(x), generator=g)
        hits = 0
        for i in range(0, len(x), bs):
            b = perm[i:i + bs]
            xb = random_crop_flip(x[b], 4) if args.victim_augment else x[b]
            logits = model(xb)
            loss = F.cross_entropy(logits, y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            hits += (logits.argmax(1) == y[b]).sum().item()
    test = accuracy(model, xt, yt)
    print(f"victim: last-epoch train acc {hits / len(x):.3f}, clean test acc {test:.3f}", flush=True)
    return test


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=5000)
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--eps", type=float, default=8)
    p.add_argument("--step", type=float, default=1.6)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--pass-batch", type=int, default=500)
    p.add_argument("--train-steps", type=int, default=10)
    p.add_argument("--max-rounds", type=int, default=20)
    p.add_argument("--pass-mode", choices=["eval", "train"], default="eval")
    p.add_argument("--stop", choices=["eval", "train", "none"], default="train")
    p.add_argument("--surrogate-augment", action="store_true", help="crop+flip the surrogate's perturbed batches")
    p.add_argument("--eot", type=int, default=0, help="crop/flip draws per PGD step of the noise pass (0: none)")
    p.add_argument("--stop-acc", type=float, default=0.99)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--victim-seed", type=int, default=0)
    p.add_argument("--victim-epochs", type=int, default=15)
    p.add_argument("--clean", action="store_true", help="train the victim on clean data only")
    p.add_argument("--no-victim-augment", dest="victim_augment", action="store_false",
                   help="train the victim without crop+flip")
    p.add_argument("--load", type=str, default=None, help="a protected set saved by --out: skip generation")
    p.add_argument("--noise", type=str, default=None, help="a package noise file: train the victim on it")
    p.add_argument("--out", type=str, default=None)
    args = p.parse_args()
    torch.set_num_threads(1)
    x, y, xt, yt = load(args.n, noise=args.noise)
    t0 = time.time()
    if args.load:
        xp = torch.load(args.load)["x"]
    elif args.noise:
        xp = x
    else:
        xp = x if args.clean else em(x, y, args)
    print(f"generation took {time.time() - t0:.0f} s", flush=True)
    if args.out:
        torch.save({"x": xp, "y": y}, args.out)
    victim(xp, y, xt, yt, args)


if __name__ == "__main__":
    main()
