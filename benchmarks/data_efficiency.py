"""Benchmark 2: do locality regularisers (spatial entropy, DRLoc) help ViTs learn from little data?

Implements docs/benchmarks.md section 2 on cluttered Fashion-MNIST: the benchmark ViT
(se_vit_small_patch8_64: 64x64 input, 8x8 grid, width 128, depth 6, 4 heads) trained from scratch
on n images per class, in these arms (the first three by default), over several seeds:

- ``baseline``: cross-entropy only;
- ``se``: + spatial entropy, published weight and schedule (λ = 0.01, 10-epoch linear warm-up,
  cosine decay to 0);
- ``se_no_last_skip``: the same, with the published "no last skip" last block;
- ``drloc``: + dense relative localisation (Liu et al. 2021) instead of spatial entropy, constant
  λ = :data:`DRLOC_WEIGHT` (see there for how it was chosen);
- ``se_drloc``: ``se`` and ``drloc`` together.

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
    python benchmarks/data_efficiency.py --jobs 2 --threads 1    # the full benchmark, 2 cores
    python benchmarks/data_efficiency.py --lambda-study          # + the λ study
    python benchmarks/data_efficiency.py --sizes 50 100 --seeds 5 --arms baseline se
    python benchmarks/data_efficiency.py --arms baseline se drloc se_drloc   # + DRLoc
    python benchmarks/data_efficiency.py --report benchmarks/results/data_efficiency.json

Investigation variants (``--epochs-scale``, ``--img-size``, ``--distractors``) change the recipe
in one named way and write to their own work directory and result files; ``--device cuda
--jobs N --time-budget MIN`` runs many of them on a lent GPU (benchmarks/gpu_session.sh).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import platform
import statistics
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from spatial_entropy.config import load_config
from spatial_entropy.data import build_dataset
from spatial_entropy.engine import train
from spatial_entropy.evaluation import evaluate_run

RESULTS = Path(__file__).parent / "results"
MODEL = "se_vit_small_patch8_64"

DRLOC_REFERENCE_WEIGHT = 0.1  # DRLoc's published λ for the ViT-like models (T2T-ViT, CvT)


def drloc_weight(grid_side: int) -> float:
    """DRLoc's λ for a ``grid_side`` x ``grid_side`` patch grid, fixed by a rule before any
    DRLoc result was seen: the reference λ (0.1; 0.5 is Swin's) is on the reference code's loss
    scale, about gh / 2 times our mean of normalised offsets (see
    ``spatial_entropy.drloc.drloc_loss``), so it is scaled by gh / 2."""
    return DRLOC_REFERENCE_WEIGHT * grid_side / 2


# The benchmark's 8 x 8 grid (64 px, patch 8); variants keep it (not rescaled).
DRLOC_WEIGHT = drloc_weight(8)  # 0.4

# arm -> config keys that differ from the shared recipe
ARMS: dict[str, dict] = {
    "baseline": {"se": {"weight": 0.0}},
    "se": {"se": {"weight": 0.01, "schedule": "warmup_cosine", "warmup_epochs": 10}},
    "se_no_last_skip": {
        "se": {"weight": 0.01, "schedule": "warmup_cosine", "warmup_epochs": 10},
        "no_last_skip": True,
    },
}
ARMS["drloc"] = {"se": {"weight": 0.0}, "drloc": {"weight": DRLOC_WEIGHT}}
ARMS["se_drloc"] = {"se": ARMS["se"]["se"], "drloc": {"weight": DRLOC_WEIGHT}}
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


@dataclass(frozen=True)
class Variant:
    """A deliberate departure from the benchmark, to find out *why* it shows what it shows
    (training length, grid size, clutter). Never the benchmark itself: a variant's runs go to
    their own work directory and result files, named by `suffix`."""

    epochs_scale: int = 1  # train this many times longer (same recipe, more epochs)
    img_size: int | None = None  # input side; None: the model's 64 px (8x8 grid of 8-px patches)
    distractors: int | None = None  # distractor fragments per scene (train and test); None: 4

    def suffix(self) -> str:
        parts = [f"x{self.epochs_scale}epochs"] if self.epochs_scale != 1 else []
        parts += [f"img{self.img_size}"] if self.img_size is not None else []
        parts += [f"distractors{self.distractors}"] if self.distractors is not None else []
        return "".join("_" + part for part in parts)

    def epochs(self, size: Size) -> int:
        return size.epochs * self.epochs_scale


def recipe(size: Size, seed: int, variant: Variant = Variant(), device: str = "cpu") -> dict:
    """The shared recipe, fixed before any result was seen: the small-image one (random crop
    with padding and flip, label smoothing, drop path, AdamW with cosine schedule), without
    RandAugment, random erasing and Mixup/CutMix, which need longer training than a CPU
    budget allows."""
    epochs = variant.epochs(size)
    values = {
        "model": MODEL,
        "dataset": "cluttered-fashion",
        "n_per_class": size.n_per_class,
        "epochs": epochs,
        "batch_size": 64,
        "lr": 1e-3,
        "weight_decay": 0.05,
        "warmup_epochs": max(1, epochs // 10),
        "min_lr": 1e-5,
        "drop_path": 0.1,
        "smoothing": 0.1,
        "auto_augment": None,
        "reprob": 0.0,
        "mixup": 0.0,
        "cutmix": 0.0,
        "seed": seed,
        "device": device,
        "num_workers": 0,
        "eval_every": epochs,
        "checkpoint_every": 0,
        # 20 epoch-end saves a run (and the last): a save costs about as much as an epoch of
        # these few-step epochs on a GPU; a kill loses at most 5 % of the run
        "checkpoint_epochs": max(1, epochs // 20),
        "log_every": 50,
    }
    if variant.img_size is not None:
        values["img_size"] = variant.img_size
    if variant.distractors is not None:
        values["data_options"] = {"distractors": variant.distractors}
    return values


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


def run_one(
    size: Size,
    arm: str,
    seed: int,
    work_dir: Path,
    variant: Variant = Variant(),
    device: str = "cpu",
) -> dict:
    """Train (or resume, or read back) one run and evaluate it on the test set."""
    epochs = variant.epochs(size)
    run_dir = work_dir / f"n{size.n_per_class}_e{epochs}" / arm / f"seed{seed}"
    result_path = run_dir / "result.json"
    if result_path.is_file():
        return json.loads(result_path.read_text())
    config = load_config(values=recipe(size, seed, variant, device) | ARMS[arm])
    if not (run_dir / "metrics.json").is_file():
        train(config, run_dir, resume=True)  # starts the run when it has no checkpoint
    metrics = json.loads((run_dir / "metrics.json").read_text())
    attention = evaluate_run(run_dir, "test", device=device, attention=True, mass=0.6)
    result = {
        "n_per_class": size.n_per_class,
        "epochs": epochs,
        "arm": arm,
        "seed": seed,
        "steps": metrics["steps"],
        "train_time_s": metrics["train_time_s"],
        "device": device,
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


def paired_interval(differences: list[float]) -> tuple[float, float]:
    """95% confidence interval of the mean paired difference (Student's t, n - 1 dof)."""
    from scipy.stats import t

    mean, std = mean_std(differences)
    half = t.ppf(0.975, len(differences) - 1) * std / len(differences) ** 0.5
    return mean - half, mean + half


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
        "| n / class | arm | pairs | Δ top-1 (points) | 2 × pooled seed std | Δ > 2σ? "
        "| paired 95% CI of Δ top-1 | Δ Jaccard |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (n, arm), runs in sorted(groups.items()):
        base = {r["seed"]: r for r in groups.get((n, "baseline"), [])}
        paired = [(r, base[r["seed"]]) for r in runs if r["seed"] in base]
        if arm == "baseline" or len(paired) < 2:
            continue
        d_top1 = mean_std([r["top1"] - b["top1"] for r, b in paired])
        low, high = paired_interval([r["top1"] - b["top1"] for r, b in paired])
        d_jac = mean_std([r["jaccard"] - b["jaccard"] for r, b in paired])
        pooled = (
            (mean_std([b["top1"] for _, b in paired])[1] ** 2
             + mean_std([r["top1"] for r, _ in paired])[1] ** 2) / 2
        ) ** 0.5  # fmt: skip
        verdict = "yes" if d_top1[0] > 2 * pooled else "no"
        lines.append(
            f"| {n} | {arm} | {len(paired)} | {d_top1[0]:+.1f} ± {d_top1[1]:.1f} | "
            f"{2 * pooled:.1f} | {verdict} | [{low:+.1f}, {high:+.1f}] | "
            f"{d_jac[0]:+.3f} ± {d_jac[1]:.3f} |"
        )
    return "\n".join(lines)


def _log_axis(ax, xlabel: str, ylabel: str) -> None:
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def seed_lines(ax, results: list[dict], arms: list[str], key: str, label: str) -> None:
    """One size's runs on ``ax``: ``key`` per arm (x), one grey line per seed (the pairing the
    paired differences use) and each arm's mean over the seeds that every arm with runs has, so
    that an arm further on in its seeds is not compared on a different set of them (the legend
    says so when some seeds are left out); runs without ``key`` (None) are left out."""
    by_seed = {(r["arm"], r["seed"]): r[key] for r in results if r.get(key) is not None}
    for seed in sorted({r["seed"] for r in results}):
        xs = [i for i, arm in enumerate(arms) if (arm, seed) in by_seed]
        ys = [by_seed[(arms[i], seed)] for i in xs]
        ax.plot(xs, ys, color="grey", alpha=0.5, marker=".", lw=1)
    seeds = {arm: {s for a, s in by_seed if a == arm} for arm in arms}
    present = [seeds[arm] for arm in arms if seeds[arm]]
    shared = sorted(set.intersection(*present)) if present else []
    means = [(i, mean_std([by_seed[(arm, s)] for s in shared])[0])
             for i, arm in enumerate(arms) if seeds[arm] and shared]  # fmt: skip
    every = len(shared) == len(set.union(*present)) if present else True
    legend = "mean over seeds" if every else f"mean over the {len(shared)} seeds every arm has"
    ax.plot([i for i, _ in means], [m for _, m in means], "o", color="C3", ms=9, label=legend)
    ax.set_xticks(range(len(arms)), arms, rotation=30, ha="right")
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)


def plot(results: list[dict], path: Path, title: str = "") -> None:
    """Top-1 and Jaccard against n per arm; with a single size, every seed against the arms
    instead (one line per seed: the pairing the paired differences use)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = group(results)
    sizes = sorted({n for n, _ in groups})
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    panels = ((axes[0], "top1", "test top-1 (%)"), (axes[1], "jaccard", "Jaccard"))
    if len(sizes) == 1:
        arms = [arm for arm in ARMS if (sizes[0], arm) in groups]
        for ax, key, label in panels:
            seed_lines(ax, results, arms, key, label)
        axes[0].legend()
        fig.suptitle(f"cluttered-fashion, {MODEL}{title}, n = {sizes[0]}/class: one line per seed")
    else:
        arms = [a for a in ("baseline", "se", "se_no_last_skip", "drloc", "se_drloc")
                if any(k[1] == a for k in groups)]  # fmt: skip
        for ax, key, label in panels:
            for arm in arms:
                ns = sorted(n for n, a in groups if a == arm)
                stats = [mean_std([r[key] for r in groups[(n, arm)]]) for n in ns]
                ax.errorbar(ns, [m for m, _ in stats], yerr=[s for _, s in stats], marker="o",
                            capsize=3, label=arm)  # fmt: skip
            _log_axis(ax, "training images per class", label)
        axes[0].legend()
        fig.suptitle(f"cluttered-fashion, {MODEL}{title}: mean ± std over seeds")
    _save(fig, path)


def plot_lambda(results: list[dict], path: Path, title: str = "") -> bool:
    """The λ study: top-1 and Jaccard against constant λ, beside the baseline and the published
    schedule (bands: mean ± std). Returns False (and draws nothing) without constant-λ runs."""
    groups = group(results)
    constant = sorted(
        (ARMS[arm]["se"]["weight"], n, arm) for n, arm in groups if arm.startswith("se_const_")
    )
    if not constant:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = min(n for _, n, _ in constant)
    points = [(w, arm) for w, size, arm in constant if size == n]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in ((axes[0], "top1", "test top-1 (%)"), (axes[1], "jaccard", "Jaccard")):
        stats = [mean_std([r[key] for r in groups[(n, arm)]]) for _, arm in points]
        ax.errorbar([w for w, _ in points], [m for m, _ in stats], yerr=[s for _, s in stats],
                    marker="o", capsize=3, color="C3", label="constant λ")  # fmt: skip
        for arm, color in (("baseline", "C0"), ("se", "C1")):
            if (n, arm) in groups:
                m, sd = mean_std([r[key] for r in groups[(n, arm)]])
                name = "baseline (λ = 0)" if arm == "baseline" else "published schedule, 0.01"
                ax.axhline(m, color=color, label=name)
                ax.axhspan(m - sd, m + sd, color=color, alpha=0.15)
        _log_axis(ax, "λ", label)
    axes[0].legend()
    fig.suptitle(f"λ study, {MODEL}{title}, n = {n}/class: mean ± std over seeds")
    _save(fig, path)
    return True


def warm_cache(variant: Variant) -> None:
    """Generate the variant's scenes once, before worker processes would each generate them."""
    options = {"distractors": variant.distractors} if variant.distractors is not None else None
    for split in ("train", "test"):
        build_dataset("cluttered-fashion", split, options=options)


def title_of(variant: Variant) -> str:
    return f" ({variant.suffix().lstrip('_').replace('_', ', ')})" if variant.suffix() else ""


def _worker_init(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)


def execute(
    runs: list[tuple[Size, str, int]],
    work_dir: Path,
    *,
    variant: Variant,
    device: str,
    jobs: int,
    threads: int | None,
    time_budget_s: float | None,
    run_fn: Callable[..., dict] | None = None,
    order: Callable[[tuple[Size, str, int]], tuple] | None = None,
    on_result: Callable[[tuple[Size, str, int], dict], None] | None = None,
    duration: Callable[[tuple[Size, str, int]], float] | None = None,
    refill: Callable[[], list[tuple[Size, str, int]]] | None = None,
) -> int:
    """Run (or read back) every run, ``jobs`` at a time in worker processes; start none after
    ``time_budget_s``. Returns how many runs were left unstarted.

    ``duration(run)``: its expected seconds; with a time budget, a run starts only if it is
    expected to finish within it (the next one in order that fits starts instead), so that a
    machine lent for minutes spends none of them on runs that would be cut off unrecorded.

    ``run_fn(size, arm, seed, work_dir, variant, device)`` (default `run_one`; a module-level
    function, for the worker processes) does one run (or several: a list of results, each
    reported with its own ``arm``); ``order`` sorts the runs (default: size,
    then seed, then the arms' order in ARMS); ``on_result(run, result)`` is called in this
    process as each run finishes (e.g. to record it). A run that raises is reported in one line
    and left unrecorded; the others go on (a later invocation tries it again).

    ``refill()``, called after each ``on_result``: the runs that have become available since
    it was last called (e.g. those a recorded pilot or selection unlocks; never one given
    before, so a run that failed is not tried again); they join the queue at their place in
    ``order``."""
    start = time.perf_counter()
    run_fn = run_fn or run_one
    if order is None:
        # seed-major: stopping early (time budget) leaves every arm with about as many seeds
        arm_rank = {arm: i for i, arm in enumerate(ARMS)}

        def order(run: tuple[Size, str, int]) -> tuple:
            return run[0].n_per_class, run[2], arm_rank[run[1]]

    queue = sorted(runs, key=order)
    total = len(queue)
    done = 0

    def report(run: tuple[Size, str, int], result: dict | list[dict], seconds: float) -> None:
        nonlocal done, total
        if isinstance(result, list):  # a unit that trained several runs: one line each
            total += len(result) - 1
            for one in result:
                report((run[0], one["arm"], run[2]), one, seconds)
            return
        done += 1
        size, arm, seed = run
        # a model without a [CLS] attention capture (ConViT) has no attention statistics
        jaccard, se = (f"{v:.3f}" if v is not None else "n/a"
                       for v in (result.get("jaccard"), result.get("se_mean")))  # fmt: skip
        print(
            f"[{done}/{total}] n={size.n_per_class} {arm} seed {seed}: top-1 "
            f"{result['top1']:.1f}, Jaccard {jaccard}, SE {se} ({seconds:.0f} s)",
            flush=True,
        )
        if on_result is not None:
            on_result(run, result)
        if refill is not None and (new := refill()):
            total += len(new)
            queue[:] = sorted(queue + new, key=order)

    def time_left() -> bool:
        return time_budget_s is None or time.perf_counter() - start < time_budget_s

    def next_run() -> tuple[Size, str, int] | None:
        """The first queued run that may start now (it fits in the time left), taken off."""
        if not time_left():
            return None
        left = None if time_budget_s is None else time_budget_s - (time.perf_counter() - start)
        for i, run in enumerate(queue):
            if left is None or duration is None or duration(run) <= left:
                return queue.pop(i)
        return None

    def failed(run: tuple[Size, str, int], error: BaseException) -> None:
        size, arm, seed = run
        print(f"n={size.n_per_class} {arm} seed {seed} FAILED (not recorded): "
              f"{type(error).__name__}: {error}", flush=True)  # fmt: skip

    if jobs <= 1:
        while (run := next_run()) is not None:
            t0 = time.perf_counter()
            try:
                result = run_fn(*run, work_dir, variant, device)
            except Exception as error:  # one failed run must not stop the others
                failed(run, error)
                continue
            report(run, result, time.perf_counter() - t0)
        return len(queue)
    warm_cache(variant)
    context = multiprocessing.get_context("spawn")  # no forked CUDA or OpenMP state
    with ProcessPoolExecutor(jobs, mp_context=context, initializer=_worker_init,
                             initargs=(threads,)) as pool:  # fmt: skip
        running: dict[Future, tuple[tuple[Size, str, int], float]] = {}
        while queue or running:
            while len(running) < jobs and (run := next_run()) is not None:
                future = pool.submit(run_fn, *run, work_dir, variant, device)
                running[future] = (run, time.perf_counter())
            if not running:
                break
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                run, t0 = running.pop(future)
                if future.exception() is not None:
                    failed(run, future.exception())
                else:
                    report(run, future.result(), time.perf_counter() - t0)
    return len(queue)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 sizes, 2 seeds, short runs")
    parser.add_argument("--sizes", type=int, nargs="+", help="subset of the sizes (n per class)")
    parser.add_argument("--seeds", type=int, help="override the number of seeds of every size")
    parser.add_argument("--arms", nargs="+", default=["baseline", "se", "se_no_last_skip"],
                        choices=list(ARMS), metavar="ARM",
                        help="arms to run (default: baseline se se_no_last_skip; DRLoc: drloc "
                        f"se_drloc; λ study: se_const_*); one of {', '.join(ARMS)}")  # fmt: skip
    parser.add_argument("--lambda-study", action="store_true")
    parser.add_argument("--work-dir", type=Path, default=None)
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    parser.add_argument("--threads", type=int, default=None, help="torch threads per run")
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="runs at a time, each in its own process (e.g. 2 with --threads 1 on two cores)",
    )
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument(
        "--time-budget",
        type=float,
        default=None,
        metavar="MIN",
        help="start no run after MIN minutes; the tables cover the finished runs",
    )
    lever = parser.add_argument_group(
        "variants (investigation only; own work dir and result files)"
    )
    lever.add_argument("--epochs-scale", type=int, default=1, help="train N times longer")
    lever.add_argument(
        "--img-size",
        type=int,
        default=None,
        help="input side (patch 8: 112 gives the paper's 14x14 grid)",
    )
    lever.add_argument(
        "--distractors",
        type=int,
        default=None,
        help="distractor fragments per scene (benchmark: 4)",
    )
    parser.add_argument(
        "--report",
        type=Path,
        metavar="JSON",
        help="only rebuild the .md and .png beside a result JSON (e.g. one from another machine)",
    )
    args = parser.parse_args()
    if args.report:
        record = json.loads(args.report.read_text())
        stem = args.report.with_suffix("")
        stem.with_suffix(".md").write_text(tables(record["runs"]) + "\n")
        title = title_of(Variant(**record.get("variant", {})))
        plot(record["runs"], stem.with_suffix(".png"), title)
        plot_lambda(record["runs"], stem.parent / f"{stem.name}_lambda.png", title)
        print(f"wrote {stem}.{{md,png}} from {len(record['runs'])} runs")
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.epochs_scale < 1 or args.jobs < 1:
        parser.error("--epochs-scale and --jobs must be >= 1")

    sizes = QUICK if args.quick else FULL
    if args.sizes:
        unknown = set(args.sizes) - {s.n_per_class for s in sizes}
        if unknown:
            parser.error(f"--sizes must be among {[s.n_per_class for s in sizes]}, got {unknown}")
        sizes = tuple(s for s in sizes if s.n_per_class in args.sizes)
    if args.seeds:
        sizes = tuple(Size(s.n_per_class, s.epochs, args.seeds) for s in sizes)
    variant = Variant(args.epochs_scale, args.img_size, args.distractors)
    name = "data_efficiency_quick" if args.quick else "data_efficiency"
    name += variant.suffix() + ("_cuda" if args.device == "cuda" else "")
    work_dir = args.work_dir or Path("runs") / name
    plan = Plan(sizes, args.arms, args.lambda_study)

    start = time.perf_counter()
    unstarted = execute(
        plan.runs,
        work_dir,
        variant=variant,
        device=args.device,
        jobs=args.jobs,
        threads=args.threads,
        time_budget_s=None if args.time_budget is None else args.time_budget * 60,
    )
    elapsed = time.perf_counter() - start
    if unstarted:
        print(f"time budget spent: {unstarted} of {len(plan.runs)} runs not started", flush=True)
    # Report every finished run of this work directory, so invocations that ran different
    # sizes (in turn or side by side) add up to one table.
    results = [json.loads(p.read_text()) for p in sorted(work_dir.glob("*/*/seed*/result.json"))]

    report = tables(results)
    print(report)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"{name}.md").write_text(report + "\n")
    plot(results, args.out_dir / f"{name}.png", title_of(variant))
    plot_lambda(results, args.out_dir / f"{name}_lambda.png", title_of(variant))
    record = {
        "sizes": [asdict(s) for s in sizes],
        "variant": asdict(variant),
        "arms": {a: ARMS[a] for a in sorted({r["arm"] for r in results})},
        "recipe": recipe(sizes[0], 0, variant, args.device),
        "runs": results,
        "wall_time_s_this_invocation": elapsed,
        "jobs": args.jobs,
        "machine": {
            "cpu_threads": torch.get_num_threads(),
            "platform": platform.platform(),
            "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        },
    }
    (args.out_dir / f"{name}.json").write_text(json.dumps(record, indent=2))
    print(f"wrote {args.out_dir / name}.{{md,png,json}} in {elapsed / 60:.1f} min")


if __name__ == "__main__":
    main()
