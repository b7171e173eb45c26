"""Pilot: attention Jaccard and spatial-entropy statistics of short CPU runs, with and without SE.

Trains the benchmark ViT (se_vit_small_patch8_64, 8x8 grid, 4 heads) on a small cluttered
Fashion-MNIST training set in a few arms (baseline, +SE at the published lambda, +SE with "no
last skip", optionally a larger lambda), one seed each, then measures on the 2,000-image test
set: top-1, the DINO-protocol Jaccard of the [CLS] attention against the exact object masks,
mean spatial entropy, mean number of regions and the share of single-region maps. Prints a
markdown table, writes the numbers as JSON and a side-by-side attention picture.

A pilot, not the data-efficiency benchmark: one seed, a few hundred steps, so differences of a
point or two are noise.

    python benchmarks/attention_pilot.py                     # ~15 min on two CPU cores
    python benchmarks/attention_pilot.py --epochs 2 --n-per-class 10   # smoke test
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from spatial_entropy.config import load_config
from spatial_entropy.engine import train
from spatial_entropy.evaluation import evaluate_run
from spatial_entropy.visualize import run_attention_figure, save_figure

RESULTS = Path(__file__).parent / "results"

# arm -> config keys that differ from the shared recipe
ARMS: dict[str, dict] = {
    "baseline": {"se": {"weight": 0.0}},
    "se": {"se": {"weight": 0.01}},
    "se_no_last_skip": {"se": {"weight": 0.01}, "no_last_skip": True},
    "se_lambda_0.1": {"se": {"weight": 0.1}},
}


def recipe(args: argparse.Namespace) -> dict:
    """The shared recipe: the small-image DeiT recipe without the augmentations that need long
    training (Mixup/CutMix, RandAugment, random erasing), as suits a few hundred steps."""
    return {
        "model": "se_vit_small_patch8_64",
        "dataset": "cluttered-fashion",
        "n_per_class": args.n_per_class,
        "epochs": args.epochs,
        "warmup_epochs": max(1, args.epochs // 10),
        "batch_size": 64,
        "lr": 1e-3,
        "mixup": 0.0,
        "cutmix": 0.0,
        "auto_augment": None,
        "reprob": 0.0,
        "seed": args.seed,
        "device": "cpu",
        "num_workers": 0,
        "eval_every": args.epochs,
        "checkpoint_every": 0,
    }


def run_arm(name: str, args: argparse.Namespace) -> dict:
    run_dir = args.work_dir / name
    if not (run_dir / "metrics.json").is_file():
        config = load_config(values=recipe(args) | ARMS[name])
        start = time.perf_counter()
        train(config, run_dir, resume=True)  # starts the run when it has no checkpoint
        print(f"{name}: trained in {time.perf_counter() - start:.0f} s", flush=True)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    evaluated = evaluate_run(run_dir, "test", device="cpu", attention=True, mass=0.6)
    # The test set's attention statistics; top-1 stays the validation top-1 of training.
    accuracy = ("top1", "top5", "loss", "split", "checkpoint")
    return {
        "top1": metrics["top1"],
        "steps": metrics["steps"],
        "train_time_s": metrics["train_time_s"],
        **{k: v for k, v in evaluated.items() if k not in accuracy},
    }


def table(results: dict[str, dict]) -> str:
    lines = [
        "| arm | top-1 (%) | Jaccard | SE mean | regions / map | single-region share |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['top1']:.1f} | {r['jaccard']:.3f} | {r['se_mean']:.3f} | "
            f"{r['regions_mean']:.2f} | {r['single_region_share']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--n-per-class", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work-dir", type=Path, default=Path("runs/attention_pilot"))
    parser.add_argument("--out", type=Path, default=RESULTS / "attention_pilot.json")
    parser.add_argument("--picture", type=Path, default=RESULTS / "attention_pilot.png")
    args = parser.parse_args()

    results = {name: run_arm(name, args) for name in args.arms}
    print(table(results))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "recipe": recipe(args),
        "arms": {name: ARMS[name] for name in args.arms},
        "results": results,
        "machine": {"cpu_threads": torch.get_num_threads(), "platform": platform.platform()},
    }
    args.out.write_text(json.dumps(record, indent=2))
    compared = [args.work_dir / name for name in ("baseline", "se") if name in args.arms]
    save_figure(run_attention_figure(compared, count=8, device="cpu"), args.picture)
    print(f"wrote {args.out} and {args.picture}")


if __name__ == "__main__":
    main()
