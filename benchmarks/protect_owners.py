"""What ``ue protect`` costs a model that trains on the protected photos: clean vs protected, per platform, per seed.

The same victims as ``ue protect --verify`` (:mod:`ue_lightning.protect.verify`), over several victim seeds and
several protected folders at once, so the clean victims are trained once per seed and platform. Each seed holds out
its own share of each class (clean test photos, put through the same platform as the train photos). One JSON line
per victim is appended to ``--results`` (a rerun skips the rows already there), and ``--summary`` prints mean +- sd
over the seeds.

    OMP_NUM_THREADS=1 python benchmarks/protect_owners.py --input ../shared/data/tiny-imagenet-10/train \\
        --protected em=runs/ti10-em em-classwise=runs/ti10-em-classwise --seeds 0 1 2 \\
        --platforms "as written" jpeg:75 resize:0.5 --results runs/owners.jsonl
    python benchmarks/protect_owners.py --results runs/owners.jsonl --summary
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ue_lightning.protect.images import find_images, read_photo
from ue_lightning.protect.platforms import parse_platform
from ue_lightning.protect.verify import VictimSettings, held_out, train_and_score, verdict, victim_input


def load(folder: Path, jobs) -> list[torch.Tensor]:
    return [read_photo(folder / j.relative.with_suffix(".png") if folder else j.source, None).colour for j in jobs]


def run(args: argparse.Namespace) -> None:
    results = Path(args.results)
    done = set()
    if results.is_file():
        done = {(r["data"], r["platform"], r["seed"]) for r in map(json.loads, results.read_text().splitlines())}
    jobs, _ = find_images(Path(args.input), Path(tempfile.gettempdir()) / "none")
    classes = sorted({j.class_name for j in jobs})
    labels = np.asarray([classes.index(j.class_name) for j in jobs])
    folders = dict(spec.split("=", 1) for spec in args.protected)
    images = {"clean": load(None, jobs), **{name: load(Path(f), jobs) for name, f in folders.items()}}
    trained = [name for name in images if name != "clean" or not args.no_clean]
    victim = VictimSettings(size=args.size, epochs=args.epochs)
    for seed in args.seeds:
        test = held_out(labels, args.share, seed)
        for spec in args.platforms:
            name, fn = ("as written", None) if spec == "as written" else parse_platform(spec)
            test_x = torch.stack([victim_input(c, victim.size, fn) for c, t in zip(images["clean"], test) if t])
            for data in trained:
                photos = images[data]
                if (data, name, seed) in done:
                    continue
                start = time.time()
                train_x = torch.stack([victim_input(p, victim.size, fn) for p, t in zip(photos, test) if not t])
                with tempfile.TemporaryDirectory() as work:
                    scores = train_and_score(train_x, labels[~test], test_x, labels[test], victim, seed, Path(work))
                row = {"data": data, "platform": name, "seed": seed, **scores, "victim": vars(victim),
                       "photos": len(jobs), "share": args.share, "seconds": round(time.time() - start, 1),
                       "threads": torch.get_num_threads()}
                with open(results, "a") as f:
                    f.write(json.dumps(row) + "\n")
                print(json.dumps(row), flush=True)


def summary(args: argparse.Namespace) -> None:
    for path in map(Path, args.results.split(",")):
        if not path.is_file():
            sys.exit(f"--results {path} does not exist: run this script without --summary first")
    rows = [json.loads(line) for p in args.results.split(",") for line in Path(p).read_text().splitlines()]
    cells: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        cells.setdefault((r["platform"], r["data"]), []).append(r)

    def stat(rs: list[dict], key: str) -> str:
        v = [100 * r[key] for r in rs]
        return f"{statistics.mean(v):.1f} ± {statistics.stdev(v):.1f}" if len(v) > 1 else f"{v[0]:.1f}"

    print("| published | data | seeds | train % | held-out test % | drop vs clean | verdict |")
    print("|---|---|---|---|---|---|---|")
    for (platform, data), rs in sorted(cells.items(), key=lambda kv: (kv[0][0], kv[0][1] != "clean", kv[0][1])):
        clean = cells.get((platform, "clean"), [])
        drop, word = "-", "-"
        if data != "clean" and clean:
            p, c = statistics.mean(r["test_acc"] for r in rs), statistics.mean(r["test_acc"] for r in clean)
            drop, word = f"{100 * (c - p):.1f}", verdict(p, c, 10)
        seeds = ",".join(str(r["seed"]) for r in rs)
        print(f"| {platform} | {data} | {seeds} | {stat(rs, 'train_acc')} | {stat(rs, 'test_acc')} | {drop} | {word} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", help="the clean photos (class folders)")
    parser.add_argument("--protected", nargs="*", default=[], help="name=folder of ue protect's output")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--platforms", nargs="+", default=["as written", "jpeg:75", "resize:0.5"])
    parser.add_argument("--share", type=float, default=0.1)
    parser.add_argument("--no_clean", action="store_true", help="skip the clean victims (another run trains them)")
    parser.add_argument("--size", type=int, default=VictimSettings.size)
    parser.add_argument("--epochs", type=int, default=VictimSettings.epochs)
    parser.add_argument("--results", required=True, help="a JSON-lines file (--summary: several, comma-separated)")
    parser.add_argument("--summary", action="store_true")
    args = parser.parse_args()
    summary(args) if args.summary else run(args)


if __name__ == "__main__":
    main()
