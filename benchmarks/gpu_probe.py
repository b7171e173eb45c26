"""Where a small model's training step spends its time on a GPU: launch cost, loss, data.

    python benchmarks/gpu_probe.py --device cuda --out probe.json

Measures, in one process and side by side:

- ``launch_us``: the host cost of one tiny kernel launch (1,000 in-place adds on one element),
  which bounds any eager step of many small kernels from below;
- the spatial-entropy loss forward + backward on 128x6 maps of a 14x14 grid: eager wall time,
  the kernels it launches (torch.profiler) and their summed device time, and the same loss
  through ``torch.cuda.make_graphed_callables`` (one graph launch forward, one backward);
- one training step (bf16 autocast, AdamW) of the evidence benchmark's 14x14 ViT
  (``se_vit_small_patch4_56``, batch 64, images already on the device) without and with the
  regulariser, eager and with the graphed loss; kernels per step;
- the plain step with the model's forward and backward as CUDA graphs (the floor graphs give);
- the augmented data of one batch of 64 (the benchmark's CPU transform), ms per batch;
- the engine training the evidence pilot's configuration for 15 epochs under cProfile, with
  0 and 1 loader processes: seconds per step and where they go;
- the engine's host-side cost per step (the same run with a one-block, 16-wide model) through
  DataLoaders and with its data on the device;
- that run through DataLoaders (``data_on_device: off``), with its data on the device (the
  default for this recipe), compiled (inductor's default and reduce-overhead modes) and
  without its epoch-end checkpoints: seconds per step of the loop and per epoch outside it;
- 1, 2, 4 and 8 such runs at once, one process each: seconds per step of each and steps per
  second of all together (how many runs side by side pay).
- 1, 4 and 16 copies of the ViT trained as one vmapped step (``models_batched``): ms per step
  and per copy, kernels and device time;
- 1 and 4 runs of the evidence configuration trained by ``spatial_entropy.grouped`` as one
  group (``group_engine``): seconds per step of the group and per copy, copy-steps per second
  (to set beside ``engine_parallel``'s runs side by side); with ``--group-attention explicit
  fused``, both ways of computing the group's attention.

On a CPU (``--device cpu``) the CUDA-only rows are skipped: a dry run of the script.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import statistics
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

from spatial_entropy import AttentionCapture, create_model, spatial_entropy

GRID = (14, 14)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def median_ms(fn, device: str, repeats: int = 20, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def kernels(fn, device: str) -> dict:
    """Kernels one call of ``fn`` launches and their summed device time (CUDA only)."""
    if device != "cuda":
        return {}
    from torch.profiler import ProfilerActivity, profile

    fn()
    sync(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        sync(device)
    events = [e for e in prof.events() if e.device_type.name == "CUDA"]
    return {
        "kernels": len(events),
        "device_ms": sum(e.device_time_total for e in events) / 1e3,
        "top": sorted(
            ((e.name[:60], round(e.device_time_total, 1)) for e in events),
            key=lambda item: -item[1],
        )[:8],
    }


def launch_us(device: str) -> float | None:
    if device != "cuda":
        return None
    x = torch.zeros(1, device=device)

    def launches() -> None:
        for _ in range(1000):
            x.add_(1)

    return median_ms(launches, device, repeats=5) * 1e3 / 1000


def graphed_loss(logits: torch.Tensor):
    """The loss (mean over maps) as one graphed callable of the logits."""

    def loss(x: torch.Tensor) -> torch.Tensor:
        return spatial_entropy(x, GRID).mean()

    sample = logits.detach().clone().requires_grad_(True)
    return torch.cuda.make_graphed_callables(loss, (sample,))


def loss_rows(device: str) -> dict:
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(128 * 6, 1, *GRID, generator=generator)
    logits = F.avg_pool2d(F.pad(noise, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    logits = logits.reshape(128, 6, -1).to(device)

    def eager() -> None:
        x = logits.detach().requires_grad_(True)
        spatial_entropy(x, GRID).mean().backward()

    row = {"maps": "128x6 14x14", "eager_ms": median_ms(eager, device), **kernels(eager, device)}
    if device == "cuda":
        graphed = graphed_loss(logits)

        def replay() -> None:
            x = logits.detach().requires_grad_(True)
            graphed(x).backward()

        row["graphed_ms"] = median_ms(replay, device)
        x = logits.detach().requires_grad_(True)
        value = graphed(x)
        value.backward()
        y = logits.detach().requires_grad_(True)
        reference = spatial_entropy(y, GRID).mean()
        reference.backward()
        same_value = torch.allclose(value, reference, atol=1e-6)
        same_grad = torch.allclose(x.grad, y.grad, atol=1e-6)
        row["graphed_matches_eager"] = bool(same_value and same_grad)
    return row


def step_rows(device: str, batch: int) -> dict:
    model = create_model("se_vit_small_patch4_56", num_classes=10, in_chans=1).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    images = torch.rand(batch, 1, 56, 56, device=device)
    labels = torch.randint(0, 10, (batch,), device=device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else nullcontext()
    capture = AttentionCapture(model)
    graphed = None

    def step(mode: str) -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss = F.cross_entropy(model(images), labels)
        if mode == "se":
            loss = loss + 0.01 * spatial_entropy(capture.logits, capture.grid_shape).mean()
        elif mode == "se_graphed":
            loss = loss + 0.01 * graphed(capture.logits.float())
        loss.backward()
        optimizer.step()

    rows = {"model": "se_vit_small_patch4_56", "batch": batch}
    step("se")
    if device == "cuda":
        graphed = graphed_loss(capture.logits.float())
    modes = ["plain", "se"] + (["se_graphed"] if graphed is not None else [])
    for _ in range(3):
        for mode in modes:
            step(mode)
    times = {mode: [] for mode in modes}
    for _ in range(15):  # alternating, so drift hits every mode alike
        for mode in modes:
            sync(device)
            start = time.perf_counter()
            step(mode)
            sync(device)
            times[mode].append(time.perf_counter() - start)
    for mode in modes:
        rows[f"{mode}_ms"] = statistics.median(times[mode]) * 1e3
        rows[f"{mode}_kernels"] = kernels(lambda mode=mode: step(mode), device)
    capture.remove()
    return rows


def graphed_model_step_ms(device: str, batch: int) -> dict:
    """The plain step (no regulariser) with the model's forward and backward as CUDA graphs
    (``make_graphed_callables``; autocast inside with its cache off), AdamW eager: the floor
    that graphs would give a step of many small kernels."""
    if device != "cuda":
        return {}
    model = create_model("se_vit_small_patch4_56", num_classes=10, in_chans=1).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    images = torch.rand(batch, 1, 56, 56, device=device)
    labels = torch.randint(0, 10, (batch,), device=device)

    class Bf16(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
                return self.inner(x).float()

    graphed = torch.cuda.make_graphed_callables(Bf16(model), (images,))

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(graphed(images), labels).backward()
        optimizer.step()

    return {"graphed_plain_ms": median_ms(step, device), **kernels(step, device)}


def _batched_step(device: str, batch: int, k: int):
    """One training step of ``k`` stacked, vmapped copies of the evidence ViT (see
    `models_batched`)."""
    import copy

    from torch.func import functional_call, stack_module_state, vmap

    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else nullcontext()
    models = [
        create_model("se_vit_small_patch4_56", num_classes=10, in_chans=1, drop_path_rate=0.1)
        .to(device)
        .train()
        for _ in range(k)
    ]
    params, buffers = stack_module_state(models)
    skeleton = copy.deepcopy(models[0]).to("meta")
    for module in skeleton.modules():  # explicit attention, as spatial_entropy.grouped runs it
        if hasattr(module, "fused_attn"):
            module.fused_attn = False
    optimizer = torch.optim.AdamW(list(params.values()), lr=1e-4)
    images = torch.rand(batch, 1, 56, 56, device=device)
    labels = torch.randint(0, 10, (batch,), device=device)
    forward = vmap(
        lambda p, b, x: functional_call(skeleton, (p, b), (x,)),
        in_dims=(0, 0, None), randomness="same",
    )  # fmt: skip

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            logits = forward(params, buffers, images)
        per_image = F.cross_entropy(
            logits.float().flatten(0, 1), labels.repeat(k), reduction="none"
        )
        per_image.view(k, batch).mean(1).sum().backward()
        optimizer.step()

    return step


def models_batched(device: str, batch: int, counts=(1, 4, 16)) -> list[dict]:
    """K copies of the evidence ViT (drop path 0.1) trained as one step: their parameters
    stacked and the model vmapped over them (``torch.func``) on one shared batch of ``batch``
    images, explicit attention, one drop-path draw for all (as `spatial_entropy.grouped`
    trains them), cross-entropy summed over copies (each copy's gradient is its own), bf16
    autocast on CUDA, one AdamW over the stacked parameters. ms per step of all K and per
    copy, and the kernels and device time of a step: the model's share of what a group
    saves (`group_engine` measures the whole trainer)."""
    import warnings

    rows = []
    for k in counts:
        step = _batched_step(device, batch, k)
        with warnings.catch_warnings():  # "batching rule not implemented": a loop, timed as is
            warnings.simplefilter("ignore", UserWarning)
            ms = median_ms(step, device, repeats=10)
            row = {"models": k, "ms_per_step": ms, "ms_per_model_step": ms / k}
            row |= {key: value for key, value in kernels(step, device).items() if key != "top"}
        rows.append(row)
        print(row, flush=True)
    return rows


def data_ms() -> float:
    from spatial_entropy.data import build_dataset

    dataset = build_dataset(
        "cluttered-fashion", "train", img_size=56, is_train=True, augment={}, n_per_class=100
    )
    start = time.perf_counter()
    for i in range(256):
        dataset[i % len(dataset)]
    return (time.perf_counter() - start) * 1e3 / 4  # per 64 images


def engine_run(
    device: str, num_workers: int, epochs: int, profiler=None, overrides: dict | None = None
) -> tuple[dict, float, list[dict]]:
    """The evidence pilot's configuration (n = 50, 56 px, batch 64) trained by the engine for
    ``epochs`` epochs in a scratch directory (``overrides``: other config keys); its metrics,
    the wall time of the call and its log rows."""
    import csv
    import shutil
    import sys
    import tempfile

    sys.path.insert(0, str(Path(__file__).parent))
    import evidence_v2 as ev
    from spatial_entropy.config import load_config
    from spatial_entropy.engine import train

    size = ev.Size(50, 400, 1)
    values = ev.recipe(size, 0, ev.Variant(img_size=ev.IMG_SIZE), device) | {"model": ev.VIT}
    values |= {"num_workers": num_workers, "max_steps": epochs * 7, "eval_every": 20}
    values |= overrides or {}
    run_dir = Path(tempfile.mkdtemp(dir="/dev/shm" if Path("/dev/shm").is_dir() else None))
    call = profiler.runcall if profiler is not None else (lambda fn, *a: fn(*a))
    start = time.perf_counter()
    try:
        metrics = call(train, load_config(values=values), run_dir / "run")
        wall = time.perf_counter() - start
        with open(run_dir / "run" / "log.csv", newline="") as f:
            log = list(csv.DictReader(f))
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    return metrics, wall, log


def engine_variants(device: str, epochs: int = 15, names=None) -> list[dict]:
    """The same short run eager through DataLoaders, eager with its data on the device,
    compiled (inductor, default and reduce-overhead modes), and eager with the epoch-end
    checkpoint writes skipped: seconds per step of the training loop
    after its first 5 epochs (compilation done), and seconds per epoch outside it (checkpoint,
    evaluation, log)."""
    from unittest import mock

    import spatial_entropy.engine as engine

    variants = {
        "eager_dataloader": ({"data_on_device": "off"}, False),
        "eager": ({}, False),
        "compile_default": ({"compile": True}, False),
        "compile_reduce_overhead": ({"compile": True, "compile_mode": "reduce-overhead"}, False),
        "eager_no_checkpoints": ({}, True),
    }
    unknown = set(names or ()) - set(variants)
    if unknown:
        raise ValueError(f"unknown engine variants {sorted(unknown)}; known: {list(variants)}")
    rows = []
    for name in names or list(variants):
        overrides, skip_saves = variants[name]
        no_saves = mock.patch.object(engine, "save_checkpoint", lambda *args, **kwargs: None)
        try:
            with no_saves if skip_saves else nullcontext():
                metrics, wall, log = engine_run(device, 1, epochs, overrides=overrides)
        except Exception as error:  # report it, go on with the next variant
            rows.append({"variant": name, "error": f"{type(error).__name__}: {error}"[:400]})
            print(rows[-1], flush=True)
            continue
        later_steps = int(log[-1]["step"]) - int(log[4]["step"])
        later_time = sum(float(row["epoch_time_s"]) for row in log[5:])
        loop = sum(float(row["epoch_time_s"]) for row in log)
        rows.append({
            "variant": name,
            "s_per_step_after_5_epochs": later_time / max(1, later_steps),
            "s_per_epoch_outside_the_loop": (metrics["train_time_s"] - loop) / len(log),
            "train_time_s": metrics["train_time_s"],
            "wall_s": wall,
            "top1": metrics["top1"],
        })  # fmt: skip
        print(rows[-1], flush=True)
    return rows


def engine_host(device: str, epochs: int = 40, repeats: int = 2) -> list[dict]:
    """The engine's host-side cost per step: the pilot's configuration with a model so small
    (one block, width 16, no regulariser) that its compute is negligible, through DataLoaders
    and with its data on the device, alternating; ms per step (best of ``repeats``)."""
    tiny = {"model_kwargs": {"depth": 1, "embed_dim": 16, "num_heads": 1}, "se": {"weight": 0}}
    variants = {"dataloader": {"data_on_device": "off"}, "data_on_device": {}}
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, overrides in variants.items():
            metrics, _, _ = engine_run(device, 0, epochs, overrides=tiny | overrides)
            times[name].append(metrics["train_time_s"] / metrics["steps"] * 1e3)
    return [{"variant": name, "ms_per_step": min(values), "runs_ms": values}
            for name, values in times.items()]  # fmt: skip


def engine_profile(device: str, num_workers: int, epochs: int = 15) -> dict:
    """`engine_run` under cProfile: seconds per step and the functions that take the time."""
    import cProfile
    import io
    import pstats

    profiler = cProfile.Profile()
    metrics, wall, _ = engine_run(device, num_workers, epochs, profiler)
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(30)
    lines = [line for line in text.getvalue().splitlines() if "/" in line or "{" in line]
    return {"num_workers": num_workers, "steps": metrics["steps"], "wall_s": wall,
            "s_per_step": wall / metrics["steps"], "top": lines[:30]}  # fmt: skip


def _parallel_member(device: str, epochs: int) -> tuple[int, float]:
    torch.set_num_threads(1)
    metrics, _, _ = engine_run(device, 1, epochs)
    return metrics["steps"], metrics["train_time_s"]


def engine_parallel(device: str, counts=(1, 2, 4, 8), epochs: int = 10) -> list[dict]:
    """K engine runs at once, each its own process with one loader process (as the evidence
    runs): seconds per step of each (its training loop's own clock) and the steps per second
    of all K together, for each K in ``counts``."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    rows = []
    for k in counts:
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(k, mp_context=context) as pool:
            done = list(pool.map(_parallel_member, [device] * k, [epochs] * k))
        per_step = [seconds / steps for steps, seconds in done]
        rows.append({"runs": k, "s_per_step": statistics.fmean(per_step),
                     "steps_per_s_together": sum(1 / s for s in per_step)})  # fmt: skip
        print(rows[-1], flush=True)
    return rows


def group_engine(
    device: str, counts=(1, 4), epochs: int = 5, attention=("explicit",)
) -> list[dict]:
    """The evidence configuration (n = 50, seed 0) trained by `spatial_entropy.grouped` as K
    copies in one process (the arms baseline, se, drloc, se_drloc in turn) for ``epochs``
    epochs: seconds per step of the group and per copy (median epoch time after the first,
    over 7 steps an epoch), and copy-steps per second, to set beside `engine_parallel`'s runs
    side by side; for each ``attention`` ("explicit", "fused": `train_group`'s
    ``fused_attention``) in turn."""
    import dataclasses
    import shutil
    import sys
    import tempfile

    sys.path.insert(0, str(Path(__file__).parent))
    import evidence_v2 as ev
    from spatial_entropy.grouped import train_group

    size, arms = ev.Size(50, 400, 1), ("baseline", "se", "drloc", "se_drloc")
    rows = []
    for mode, k in itertools.product(attention, counts):
        configs = [
            dataclasses.replace(  # evaluated once, at the end, on 5 % of the test split
                ev.config_for(size, arms[i % 4], 0, device),
                max_steps=epochs * 7,
                val_fraction=0.05,
            )  # fmt: skip
            for i in range(k)
        ]
        root = Path(tempfile.mkdtemp(dir="/dev/shm" if Path("/dev/shm").is_dir() else None))
        try:
            train_group(configs, [root / str(i) for i in range(k)],
                        fused_attention=mode == "fused")  # fmt: skip
            with open(root / "0" / "log.csv", newline="") as f:
                times = [float(r["epoch_time_s"]) for r in csv.DictReader(f)][1:]
        finally:
            shutil.rmtree(root, ignore_errors=True)
        group_step = statistics.median(times) / 7
        rows.append({"copies": k, "attention": mode, "s_per_group_step": group_step,
                     "s_per_copy_step": group_step / k,
                     "copy_steps_per_s": k / group_step})  # fmt: skip
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--parts", nargs="*", default=None, help="in this order; default: all")
    parser.add_argument("--runs-at-once", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument(
        "--models-at-once", type=int, nargs="+", default=[1, 4, 16], help="of models_batched"
    )
    parser.add_argument(
        "--copies-at-once", type=int, nargs="+", default=[1, 4], help="of group_engine"
    )
    parser.add_argument(
        "--engine-epochs", type=int, default=10, help="of engine_variants and engine_parallel"
    )
    parser.add_argument("--engine-variants", nargs="+", default=None,
                        help="of engine_variants (default: all), e.g. eager")  # fmt: skip
    parser.add_argument("--group-attention", nargs="+", default=["explicit"],
                        choices=["explicit", "fused"], help="of group_engine")  # fmt: skip
    args = parser.parse_args()
    torch.manual_seed(0)
    result = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu"}
    parts = {
        "launch_us": lambda: launch_us(args.device),
        "loss": lambda: loss_rows(args.device),
        "step": lambda: step_rows(args.device, args.batch),
        "graphed_step": lambda: graphed_model_step_ms(args.device, args.batch),
        "models_batched": lambda: models_batched(args.device, args.batch, args.models_at_once),
        "data_ms_per_64": data_ms,
        "engine_workers0": lambda: engine_profile(args.device, 0),
        "engine_workers1": lambda: engine_profile(args.device, 1),
        "engine_host": lambda: engine_host(args.device),
        "engine_variants": lambda: engine_variants(
            args.device, max(6, args.engine_epochs), args.engine_variants
        ),
        "engine_parallel": lambda: engine_parallel(
            args.device, args.runs_at_once, args.engine_epochs
        ),
        "group_engine": lambda: group_engine(
            args.device, args.copies_at_once, max(2, args.engine_epochs), args.group_attention
        ),
    }
    unknown = set(args.parts or ()) - set(parts)
    if unknown:
        parser.error(f"--parts: unknown {sorted(unknown)}; known: {list(parts)}")
    for name in args.parts or list(parts):  # in the order asked for
        part = parts[name]
        try:
            result[name] = part()
        except Exception as error:  # report it and go on with the other parts
            result[name] = {"error": f"{type(error).__name__}: {error}"}
        print(name, json.dumps(result[name]), flush=True)
        if args.out:
            args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
