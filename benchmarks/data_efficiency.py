"""Benchmark 2: does the spatial-entropy regulariser help ViTs learn from little data?

Implements ../shared/benchmarks.md section 2 on cluttered Fashion-MNIST: the benchmark ViT
(se_vit_small_patch8_64: 64x64 input, 8x8 grid, width 128, depth 6, 4 heads) trained from scratch
on n images per class, in three arms, over several seeds:

- ``baseline``: cross-entropy only;
- ``se``: + spatial entropy, published weight and schedule (λ = 0.01, 10-epoch linear warm-up,
  cosine decay to 0);
- ``se_no_last_skip``: the same, with the published "no last skip" last block.

Every arm of one training-set size runs the same number of optimisation steps with the same
recipe; seed k gives every arm the same training subset, initial weights and data order. On the
fixed 2,000-image test set each run reports top-1, the DINO-protocol Jaccard of the [CLS]
attention against the exact object masks, the mean spatial entropy and the mean number of
regions per map. ``--lambda-study`` adds constant λ in {0.001, 0.01, 0.1, 1} at the smallest size.

Outputs (under ``--out-dir``, default benchmarks/results/): ``data_efficiency.md`` (mean ± std
tables), ``data_efficiency.png`` (top-1 and Jaccard against n per arm), ``data_efficiency.json``
(every run). They cover every finished run in the work directory, so sizes may be run by
separate invocations (e.g. one per core with ``--threads 1``). Resumable: finished runs are read
back, interrupted ones continue from their latest checkpoint (epoch ends).

    python benchmarks/data_efficiency.py --quick                 # < 15 min on two CPU cores
    python benchmarks/data_efficiency.py                         # the full benchmark
    python benchmarks/data_efficiency.py --lambda-study          # + the λ study
    python benchmarks/data_efficiency.py --sizes 50 100 --seeds 5 --arms baseline se
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from spatial_entropy.config import load_config
from spatial_entropy.engine import train
from spatial_entropy.evaluation import evaluate_run_attention

RESULTS = Path(__file__).parent / "results"
MODEL = "se_vit_small_patch8_64"

# arm -> config keys that differ from the shared recipe
ARMS: dict[str, dict] = {
    "baseline": {"se": {"weight": 0.0}},
    "se": {"se": {"weight": 0.01, "schedule": "warmup_cosine", "warmup_epochs": 10}},
    "se_no_last_skip": {
        "se": {"weight": 0.01, "schedule": "warmup_cosine", "warmup_epochs": 10},
        "no_last_skip": True,
    },
}
LAMBDAS = (0.001, 0.01, 0.1, 1.0)
for _weight in LAMBDAS:
    ARMS[f"se_const_{_weight:g}"] = {"se": {"weight": _weight, "schedule": "constant"}}


@dataclass(frozen=True)
class Size:
    """A training-set size and its budget: ``epochs`` is chosen so steps grow slowly with n."""

    n_per_class: int
    epochs: int
    seeds: int


# A training step of this model at batch 64 costs about 0.5 s on two CPU cores, so the full
# budget is about 350-470 optimisation steps per run (epochs shrink as n grows): 48 runs in
# under 3 hours. More seeds where the claim is (the two smallest sizes).
FULL = (Size(50, 50, 5), Size(100, 25, 5), Size(300, 8, 3), Size(1000, 3, 3))
QUICK = (Size(50, 12, 2), Size(100, 6, 2))


def recipe(size: Size, seed: int) -> dict:
    """The shared recipe, fixed before any result was seen: the small-image one (random crop
    with padding and flip, label smoothing, drop path, AdamW with cosine schedule), without
    RandAugment, random erasing and Mixup/CutMix, which need longer training than a CPU
    budget allows."""
    return {
        "model": MODEL,
        "dataset": "cluttered-fashion",
        "n_per_class": size.n_per_class,
        "epochs": size.epochs,
        "batch_size": 64,
        "lr": 1e-3,
        "weight_decay": 0.05,
        "warmup_epochs": max(1, size.epochs // 10),
        "min_lr": 1e-5,
        "drop_path": 0.1,
        "smoothing": 0.1,
        "auto_augment": None,
        "reprob": 0.0,
        "mixup": 0.0,
        "cutmix": 0.0,
        "seed": seed,
        "device": "cpu",
        "num_workers": 0,
        "eval_every": size.epochs,
        "checkpoint_every": 0,
        "log_every": 50,
    }


@dataclass
class Plan:
    sizes: tuple[Size, ...]
    arms: list[str]
    lambda_study: bool
    runs: list[tuple[Size, str, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        for size in self.sizes:
            for seed in range(size.seeds):
                self.runs += [(size, arm, seed) for arm in self.arms]
        if self.lambda_study:
            smallest = min(self.sizes, key=lambda s: s.n_per_class)
            for seed in range(min(smallest.seeds, 3)):
                self.runs += [(smallest, f"se_const_{w:g}", seed) for w in LAMBDAS]
                self.runs += [
                    (smallest, arm, seed) for arm in ("baseline", "se") if arm not in self.arms
                ]


def run_one(size: Size, arm: str, seed: int, work_dir: Path) -> dict:
    """Train (or resume, or read back) one run and evaluate it on the test set."""
    run_dir = work_dir / f"n{size.n_per_class}_e{size.epochs}" / arm / f"seed{seed}"
    result_path = run_dir / "result.json"
    if result_path.is_file():
        return json.loads(result_path.read_text())
    config = load_config(values=recipe(size, seed) | ARMS[arm])
    if not (run_dir / "metrics.json").is_file():
        train(config, run_dir, resume=(run_dir / "checkpoints").is_dir())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    attention = evaluate_run_attention(run_dir, "test", device="cpu", mass=0.6)
    result = {
        "n_per_class": size.n_per_class,
        "epochs": size.epochs,
        "arm": arm,
        "seed": seed,
        "steps": metrics["steps"],
        "train_time_s": metrics["train_time_s"],
        "top1": metrics["top1"],
        "jaccard": attention["jaccard"],
        "se_mean": attention["se_mean"],
        "regions_mean": attention["regions_mean"],
        "single_region_share": attention["single_region_share"],
    }
    tmp = result_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    tmp.replace(result_path)  # a finished run is marked only once its result is complete
    return result


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def group(results: list[dict]) -> dict[tuple[int, str], list[dict]]:
    groups: dict[tuple[int, str], list[dict]] = {}
    for r in results:
        groups.setdefault((r["n_per_class"], r["arm"]), []).append(r)
    return groups


def tables(results: list[dict]) -> str:
    groups = group(results)
    lines = [
        "| n / class | arm | seeds | steps | top-1 (%) | Jaccard | SE mean | regions / map |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (n, arm), runs in sorted(groups.items()):
        cells = [f"{m:.3f} ± {s:.3f}" for m, s in (mean_std([r[k] for r in runs])
                 for k in ("jaccard", "se_mean", "regions_mean"))]  # fmt: skip
        top1 = "{:.1f} ± {:.1f}".format(*mean_std([r["top1"] for r in runs]))
        lines.append(
            f"| {n} | {arm} | {len(runs)} | {runs[0]['steps']} | {top1} | "
            + " | ".join(cells)
            + " |"
        )
    lines += [
        "",
        "Paired differences against the baseline (same seed: same data, init, order):",
        "",
    ]
    lines += [
        "| n / class | arm | Δ top-1 (points) | 2 × pooled seed std | Δ > 2σ? | Δ Jaccard |",
        "|---|---|---|---|---|---|",
    ]
    for (n, arm), runs in sorted(groups.items()):
        base = {r["seed"]: r for r in groups.get((n, "baseline"), [])}
        paired = [(r, base[r["seed"]]) for r in runs if r["seed"] in base]
        if arm == "baseline" or len(paired) < 2:
            continue
        d_top1 = mean_std([r["top1"] - b["top1"] for r, b in paired])
        d_jac = mean_std([r["jaccard"] - b["jaccard"] for r, b in paired])
        pooled = (
            (mean_std([b["top1"] for _, b in paired])[1] ** 2
             + mean_std([r["top1"] for r, _ in paired])[1] ** 2) / 2
        ) ** 0.5  # fmt: skip
        verdict = "yes" if d_top1[0] > 2 * pooled else "no"
        lines.append(
            f"| {n} | {arm} | {d_top1[0]:+.1f} ± {d_top1[1]:.1f} | {2 * pooled:.1f} | {verdict} | "
            f"{d_jac[0]:+.3f} ± {d_jac[1]:.3f} |"
        )
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = group(results)
    arms = [a for a in ("baseline", "se", "se_no_last_skip") if any(k[1] == a for k in groups)]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in ((axes[0], "top1", "test top-1 (%)"), (axes[1], "jaccard", "Jaccard")):
        for arm in arms:
            ns = sorted(n for n, a in groups if a == arm)
            stats = [mean_std([r[key] for r in groups[(n, arm)]]) for n in ns]
            ax.errorbar(ns, [m for m, _ in stats], yerr=[s for _, s in stats], marker="o",
                        capsize=3, label=arm)  # fmt: skip
        ax.set_xscale("log")
        ax.set_xlabel("training images per class")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"cluttered-fashion, {MODEL}: mean ± std over seeds")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 sizes, 2 seeds, short runs")
    parser.add_argument("--sizes", type=int, nargs="+", help="subset of the sizes (n per class)")
    parser.add_argument("--seeds", type=int, help="override the number of seeds of every size")
    parser.add_argument("--arms", nargs="+", default=["baseline", "se", "se_no_last_skip"],
                        choices=list(ARMS))  # fmt: skip
    parser.add_argument("--lambda-study", action="store_true")
    parser.add_argument("--work-dir", type=Path, default=None)
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    sizes = QUICK if args.quick else FULL
    if args.sizes:
        unknown = set(args.sizes) - {s.n_per_class for s in sizes}
        if unknown:
            parser.error(f"--sizes must be among {[s.n_per_class for s in sizes]}, got {unknown}")
        sizes = tuple(s for s in sizes if s.n_per_class in args.sizes)
    if args.seeds:
        sizes = tuple(Size(s.n_per_class, s.epochs, args.seeds) for s in sizes)
    name = "data_efficiency_quick" if args.quick else "data_efficiency"
    work_dir = args.work_dir or Path("runs") / name
    plan = Plan(sizes, args.arms, args.lambda_study)

    start = time.perf_counter()
    results = []
    for i, (size, arm, seed) in enumerate(plan.runs, 1):
        t0 = time.perf_counter()
        results.append(run_one(size, arm, seed, work_dir))
        r = results[-1]
        print(f"[{i}/{len(plan.runs)}] n={size.n_per_class} {arm} seed {seed}: top-1 "
              f"{r['top1']:.1f}, Jaccard {r['jaccard']:.3f}, SE {r['se_mean']:.3f} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)  # fmt: skip
    elapsed = time.perf_counter() - start
    # Report every finished run of this work directory, so invocations that ran different
    # sizes (in turn or side by side) add up to one table.
    results = [json.loads(p.read_text()) for p in sorted(work_dir.glob("*/*/seed*/result.json"))]

    report = tables(results)
    print(report)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"{name}.md").write_text(report + "\n")
    plot(results, args.out_dir / f"{name}.png")
    record = {
        "sizes": [asdict(s) for s in sizes],
        "arms": {a: ARMS[a] for a in sorted({r["arm"] for r in results})},
        "recipe": recipe(sizes[0], 0),
        "runs": results,
        "wall_time_s_this_invocation": elapsed,
        "machine": {"cpu_threads": torch.get_num_threads(), "platform": platform.platform()},
    }
    (args.out_dir / f"{name}.json").write_text(json.dumps(record, indent=2))
    print(f"wrote {args.out_dir / name}.{{md,png,json}} in {elapsed / 60:.1f} min")


if __name__ == "__main__":
    main()
