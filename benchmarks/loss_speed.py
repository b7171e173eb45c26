"""Benchmark 1: spatial-entropy loss (forward + backward) against two per-map baselines.

Usage:
    python benchmarks/loss_speed.py [--device cpu|cuda] [--repeats 10] [--out FILE.json]
        [--alternatives] [--models vit_small_patch16_224 ...] [--model-batch 128]

Prints, per shape, the median forward + backward time of

- ``reference``: ``reference_spatial_entropy``, a Python loop over maps and over regions (one
  boolean mask and one sum per region): the test oracle, the slowest way;
- ``authors``: the structure of the authors' loss: one labelling call per map (scipy here,
  OpenCV there), then one mask per region stacked and summed in one vectorised expression
  (for all maps at once: the fastest form of that structure);
- ``ours``: ``spatial_entropy`` with ``backend="auto"`` (scipy on CPU; on CUDA the transitive
  closure up to 576 patches, propagation above), and with ``--alternatives`` the other exact
  labellers (``closure``, over row runs; ``closure_pixels``, the closure over pixels it
  replaced; ``propagate``, ``scipy``) on the same logits, and the loss under
  ``torch.compile`` at 128x6, 14x14;

and on CUDA the host synchronisations per call of each (``torch.cuda.set_sync_debug_mode``).
Then the share of one training step (forward, backward, AdamW) that the loss costs: for the
benchmark model ``se_vit_small_patch8_64`` at batch 128, and for each ``--models`` name (timm
ViTs at their native resolution, bf16 autocast on CUDA, ``--model-batch`` images, halved until
it fits) with and without the regulariser. Timings are medians over repeats after warm-up,
measured side by side in this one process.
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import statistics
import time
import warnings
from contextlib import nullcontext
from pathlib import Path
from unittest import mock

import numpy as np
import scipy.ndimage
import torch
import torch.nn.functional as F

from spatial_entropy import components, reference_spatial_entropy, spatial_entropy

pixel_closure = components._label_closure_pixels

SHAPES = [
    (64, 3, (8, 8)),
    (128, 6, (14, 14)),
    (256, 12, (14, 14)),
    (32, 6, (24, 24)),
    (128, 6, (14, 10)),
]
# The paper's models: ViT-S/16 and ViT-B/16 at 224 px (14x14 grid), ViT-S/16 at 384 (24x24).
REAL_MODELS = ["vit_small_patch16_224", "vit_base_patch16_224", "vit_small_patch16_384"]
BENCHMARK_MODEL = "se_vit_small_patch8_64"
SE_WEIGHT = 0.01


def smooth_logits(batch: int, heads: int, grid: tuple[int, int], seed: int = 0) -> torch.Tensor:
    """Random logits smoothed with a 3x3 box filter, so maps have blobs as real attention does."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(batch * heads, 1, *grid, generator=generator)
    smooth = F.avg_pool2d(F.pad(noise, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    return smooth.reshape(batch, heads, -1)


def authors_style_spatial_entropy(logits: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """The authors' structure: label each map on the host, then sum every region in one go.

    A Python loop calls the connected-component labelling once per map (scipy here, OpenCV in
    the authors' code), after copying the foreground to the host; then one vectorised
    expression stacks one mask per region, for all maps at once (padded to the largest region
    count), and takes the regions' masses and the entropy of their shares. Batching the masks
    across maps is the fastest form of that structure, so the ratio against it is the
    conservative one. A benchmark baseline, not the library's oracle (that is
    ``reference_spatial_entropy``).
    """
    structure = scipy.ndimage.generate_binary_structure(2, 2)
    scores = logits.float().reshape(-1, grid[0] * grid[1])
    weights = torch.relu(scores - scores.mean(dim=-1, keepdim=True))
    foreground = (weights > 0).reshape(-1, *grid).cpu().numpy()
    labels = np.stack([scipy.ndimage.label(mask, structure=structure)[0] for mask in foreground])
    ids = torch.from_numpy(labels.reshape(len(labels), -1)).to(logits.device)
    regions = torch.arange(1, int(labels.max()) + 1, device=logits.device)
    masks = ids.unsqueeze(1) == regions.view(1, -1, 1)  # (maps, regions, patches)
    mass = (masks * weights.unsqueeze(1)).sum(dim=-1)
    share = mass / weights.sum(dim=-1, keepdim=True).clamp(min=np.finfo(np.float32).tiny)
    entropy = -(share * torch.log(share.clamp(min=1e-30))).sum(dim=-1)
    return entropy.reshape(logits.shape[:2])


def model_logits(batch: int, device: str) -> tuple[str, torch.Tensor, tuple[int, int]]:
    """Logits captured from a forward pass of the benchmark model (random initialisation)."""
    from spatial_entropy import AttentionCapture, create_model

    model = create_model(BENCHMARK_MODEL, num_classes=10, img_size=64, in_chans=3)
    model = model.to(device).eval()
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(batch, 3, 64, 64, generator=generator).to(device)
    with AttentionCapture(model) as capture, torch.no_grad():
        model(images)
        return BENCHMARK_MODEL, capture.logits.float().cpu(), capture.grid_shape


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_calls(fns, repeats: int, device: str, warmup: int = 2) -> list[float]:
    """Median ms of each function, timed in turn within every repeat (drift hits all alike)."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, spent in zip(fns, times, strict=True):
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            spent.append(time.perf_counter() - start)
    return [statistics.median(spent) * 1e3 for spent in times]


def time_call(fn, repeats: int, device: str, warmup: int = 2) -> float:
    return time_calls([fn], repeats, device, warmup)[0]


def forward_backward(loss_fn, logits: torch.Tensor, grid: tuple[int, int]):
    def run() -> None:
        x = logits.detach().requires_grad_(True)
        loss_fn(x, grid).mean().backward()

    return run


def count_syncs(fn) -> int:
    """Host synchronisations of one call of ``fn`` on CUDA (0 on any other device)."""
    if not torch.cuda.is_available():
        return 0
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    # the first switch to "warn" also warns that the mode is a prototype: not a synchronisation
    return sum("called a synchronizing" in str(w.message) for w in caught)


def cuda_graph_check(logits: torch.Tensor, grid: tuple[int, int]) -> dict:
    """Capture the loss forward + backward in a CUDA graph, replay it on new logits, compare."""
    static = logits.detach().clone().requires_grad_(True)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up on a side stream, as torch.cuda.graphs asks
        for _ in range(2):
            static.grad = None
            spatial_entropy(static, grid).mean().backward()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    static.grad = None
    with torch.cuda.graph(graph):
        value = spatial_entropy(static, grid).mean()
        value.backward()
    fresh = torch.randn_like(logits)
    with torch.no_grad():
        static.copy_(fresh)
    graph.replay()
    x = fresh.clone().requires_grad_(True)
    eager = spatial_entropy(x, grid).mean()
    eager.backward()
    return {
        "captured": True,
        "value_matches_eager": bool(torch.allclose(value, eager, atol=1e-6)),
        "grad_matches_eager": bool(torch.allclose(static.grad, x.grad, atol=1e-6)),
    }


def loss_rows(device: str, args: argparse.Namespace) -> list[dict]:
    shapes = SHAPES[: args.shapes]
    cases = [(f"smooth {b}x{h} {g[0]}x{g[1]}", smooth_logits(b, h, g), g) for b, h, g in shapes]
    if args.model_logits:
        name, logits, grid = model_logits(128, device)
        cases.append((f"{name} 128x{logits.shape[1]} {grid[0]}x{grid[1]}", logits, grid))
    ours = {"ours": "auto"}
    if args.alternatives:
        ours |= {"closure": "closure", "closure_pixels": "closure_pixels",
                 "propagate": "propagate", "scipy": "scipy"}  # fmt: skip
    header = f"{'logits':<36} {'reference ms':>13} {'authors ms':>11}"
    header += "".join(f" {name + ' ms':>12}" for name in ours)
    header += f" {'vs reference':>13} {'vs authors':>11}"
    if device == "cuda":
        header += "".join(f" {name + ' syncs':>13}" for name in ours)
    print(header)
    rows = []
    for label, logits, grid in cases:
        logits = logits.to(device)
        row = {"logits": label, "shape": list(logits.shape), "grid": list(grid)}
        row["reference_ms"] = time_call(
            forward_backward(reference_spatial_entropy, logits, grid),
            args.reference_repeats,
            device,
            warmup=1,
        )
        row["authors_ms"] = time_call(
            forward_backward(authors_style_spatial_entropy, logits, grid),
            args.reference_repeats,
            device,
            warmup=1,
        )
        for name, backend in ours.items():

            def loss(x, g, backend=backend):
                if backend == "closure_pixels":  # the closure over pixels, not row runs
                    with mock.patch.object(components, "_label_closure", pixel_closure):
                        return spatial_entropy(x, g, backend="closure")
                return spatial_entropy(x, g, backend=backend)

            row[f"{name}_ms"] = time_call(
                forward_backward(loss, logits, grid), args.repeats, device
            )
            if device == "cuda":
                row[f"{name}_syncs_per_call"] = count_syncs(forward_backward(loss, logits, grid))
        row["ratio_vs_reference"] = row["reference_ms"] / row["ours_ms"]
        row["ratio_vs_authors"] = row["authors_ms"] / row["ours_ms"]
        line = f"{label:<36} {row['reference_ms']:>13.2f} {row['authors_ms']:>11.2f}"
        line += "".join(f" {row[name + '_ms']:>12.3f}" for name in ours)
        line += f" {row['ratio_vs_reference']:>12.1f}x {row['ratio_vs_authors']:>10.1f}x"
        if device == "cuda":
            line += "".join(f" {row[name + '_syncs_per_call']:>13}" for name in ours)
        print(line)
        rows.append(row)
    return rows


def compiled_row(device: str, repeats: int) -> dict:
    """The loss (``backend="torch"``, the sync-free path ``auto`` takes on CUDA) under
    ``torch.compile(fullgraph=True)`` (inductor: element-wise kernels fused) at 128x6, 14x14,
    against eager in the same repeats; compile time excluded (warm-up)."""
    logits = smooth_logits(128, 6, (14, 14)).to(device)
    eager = functools.partial(spatial_entropy, backend="torch")  # the sync-free path
    compiled = torch.compile(eager, fullgraph=True, dynamic=False)
    start = time.perf_counter()
    forward_backward(compiled, logits, (14, 14))()
    compile_s = time.perf_counter() - start
    eager_ms, compiled_ms = time_calls(
        [forward_backward(eager, logits, (14, 14)),
         forward_backward(compiled, logits, (14, 14))], repeats, device
    )  # fmt: skip
    x, y = (logits.detach().requires_grad_(True) for _ in range(2))
    value, reference = compiled(x, (14, 14)), eager(y, (14, 14))
    value.sum().backward()
    reference.sum().backward()
    return {
        "logits": "smooth 128x6 14x14",
        "eager_ms": eager_ms,
        "compiled_ms": compiled_ms,
        "compile_s": compile_s,
        "matches_eager": bool(
            torch.allclose(value, reference, atol=1e-5)
            and torch.allclose(x.grad, y.grad, atol=1e-5)
        ),
    }


def train_step_ms(
    name: str,
    batch: int,
    device: str,
    repeats: int,
    *,
    img_size: int | None = None,
    num_classes: int = 1000,
) -> dict:
    """One training step (forward, backward, AdamW) with and without the regulariser.

    bf16 autocast on CUDA, float32 on CPU. Returns the median step times, the loss alone on the
    step's captured logits, and the share of the regularised step that the regulariser costs.
    """
    from spatial_entropy import AttentionCapture, create_model

    model = create_model(name, num_classes=num_classes, img_size=img_size)
    model = model.to(device).train()
    size = model.patch_embed.img_size
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    images = torch.rand(batch, 3, *size, device=device)
    labels = torch.randint(0, num_classes, (batch,), device=device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else nullcontext()
    capture = AttentionCapture(model)

    def step(regularise: bool) -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss = F.cross_entropy(model(images), labels)
            if regularise:
                loss = loss + SE_WEIGHT * spatial_entropy(capture.logits, capture.grid_shape).mean()
        loss.backward()
        optimizer.step()

    try:
        without, with_se = time_calls([lambda: step(False), lambda: step(True)], repeats, device)
        logits = capture.logits.detach()
        loss_ms = time_call(
            forward_backward(spatial_entropy, logits, capture.grid_shape), repeats, device
        )
        syncs = count_syncs(lambda: step(True)) if device == "cuda" else None
    finally:
        capture.remove()
    return {
        "model": name,
        "img_size": list(size),
        "grid": list(capture.grid_shape),
        "batch": batch,
        "amp": "bf16" if device == "cuda" else None,
        "step_ms_without_se": without,
        "step_ms_with_se": with_se,
        "loss_ms": loss_ms,
        "share": (with_se - without) / with_se,
        "loss_share": loss_ms / with_se,
        "step_syncs_with_se": syncs,
    }


def fitting_train_step(name: str, batch: int, device: str, repeats: int) -> dict:
    """``train_step_ms`` at ``batch``, halved on CUDA out-of-memory until it fits."""
    while True:
        try:
            return train_step_ms(name, batch, device, repeats)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            if batch == 1:
                raise
            print(f"  {name}: batch {batch} does not fit, trying {batch // 2}")
            batch //= 2


def print_step(step: dict) -> None:
    print(
        f"training step of {step['model']} ({step['grid'][0]}x{step['grid'][1]} grid), batch "
        f"{step['batch']}: {step['step_ms_without_se']:.1f} ms without the regulariser, "
        f"{step['step_ms_with_se']:.1f} ms with it: {100 * step['share']:.1f} % of the step "
        f"(loss fwd+bwd alone {step['loss_ms']:.2f} ms = {100 * step['loss_share']:.1f} %)"
        + (
            f"; {step['step_syncs_with_se']} host syncs"
            if step["step_syncs_with_se"] is not None
            else ""
        )
    )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=10, help="timed repeats of the batched loss")
    parser.add_argument("--reference-repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument(
        "--alternatives", action="store_true", help="also time each exact labeller on its own"
    )
    parser.add_argument(
        "--shapes", type=int, default=None, help="only the first K smooth shapes (smoke tests)"
    )
    parser.add_argument(
        "--no-model-logits",
        dest="model_logits",
        action="store_false",
        help="skip the row of logits captured from the benchmark model",
    )
    parser.add_argument(
        "--step-batch", type=int, default=128, help="batch of the benchmark model's step"
    )
    parser.add_argument(
        "--models",
        nargs="*",
        default=None,
        help=f"timm ViTs whose training step to time (default on CUDA: {' '.join(REAL_MODELS)}; "
        "none on CPU)",
    )
    parser.add_argument("--model-batch", type=int, default=128)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    models = args.models if args.models is not None else (REAL_MODELS if device == "cuda" else [])
    out = args.out or Path(__file__).parent / "results" / f"loss_speed_{device}.json"

    print(f"device: {device} ({device_name(device)}), torch {torch.__version__}")
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after every part, so a run stopped at a time limit keeps what it did
        out.write_text(json.dumps(result, indent=2))

    result = {
        "device": device,
        "device_name": device_name(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "rows": loss_rows(device, args),
    }
    save()
    if device == "cuda":
        try:
            result["cuda_graph"] = cuda_graph_check(
                smooth_logits(128, 6, (14, 14)).cuda(), (14, 14)
            )
        except Exception as error:  # report what stands in the way instead of stopping the run
            result["cuda_graph"] = {"captured": False, "error": f"{type(error).__name__}: {error}"}
        print(f"CUDA graph of the loss forward + backward: {result['cuda_graph']}")
    if args.alternatives:
        try:
            result["compiled"] = compiled_row(device, args.repeats)
        except Exception as error:  # report what stands in the way instead of stopping the run
            result["compiled"] = {"error": f"{type(error).__name__}: {error}"}
        print(f"torch.compile of the loss: {result['compiled']}")
        save()
    result["train_steps"] = steps = [
        train_step_ms(
            BENCHMARK_MODEL, args.step_batch, device, args.repeats, img_size=64, num_classes=10
        )
    ]
    print_step(steps[0])
    save()
    for name in models:
        steps.append(fitting_train_step(name, args.model_batch, device, args.repeats))
        print_step(steps[-1])
        save()
    print(f"wrote {out}")
    return result


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return platform.processor() or platform.machine()


if __name__ == "__main__":
    main()
