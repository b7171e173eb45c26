"""Benchmark 1: spatial-entropy loss (forward + backward) against the per-map reference loop.

Usage:
    python benchmarks/loss_speed.py [--device cpu|cuda] [--repeats 10] [--out FILE.json]

Prints, per shape, the median time of the reference loop (one scipy labelling and one mask
per region per map, as the authors' code does), of the batched loss, and their ratio; then the
share of one training step of the benchmark model that the loss costs. Timings are medians
over repeats after warm-up, measured side by side in this one process.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from spatial_entropy import reference_spatial_entropy, spatial_entropy

SHAPES = [
    (64, 3, (8, 8)),
    (128, 6, (14, 14)),
    (256, 12, (14, 14)),
    (32, 6, (24, 24)),
    (128, 6, (14, 10)),
]


def smooth_logits(batch: int, heads: int, grid: tuple[int, int], seed: int = 0) -> torch.Tensor:
    """Random logits smoothed with a 3x3 box filter, so maps have blobs as real attention does."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(batch * heads, 1, *grid, generator=generator)
    smooth = F.avg_pool2d(F.pad(noise, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    return smooth.reshape(batch, heads, -1)


def model_logits(batch: int, device: str) -> tuple[str, torch.Tensor, tuple[int, int]]:
    """Logits captured from a forward pass of the benchmark model (random initialisation)."""
    from spatial_entropy import AttentionCapture, create_model

    name = "se_vit_small_patch8_64"
    model = create_model(name, num_classes=10, img_size=64, in_chans=3).to(device).eval()
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(batch, 3, 64, 64, generator=generator).to(device)
    with AttentionCapture(model) as capture, torch.no_grad():
        model(images)
        return name, capture.logits.float().cpu(), capture.grid_shape


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_call(fn, repeats: int, device: str, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def forward_backward(loss_fn, logits: torch.Tensor, grid: tuple[int, int]):
    def run() -> None:
        x = logits.detach().requires_grad_(True)
        loss_fn(x, grid).mean().backward()

    return run


def count_syncs(logits: torch.Tensor, grid: tuple[int, int]) -> int:
    x = logits.detach().requires_grad_(True)
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            spatial_entropy(x, grid).mean()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    # the first switch to "warn" also warns that the mode is a prototype: not a synchronisation
    return sum("called a synchronizing" in str(w.message) for w in caught)


def train_step_ms(device: str, batch: int, repeats: int) -> tuple[float, float]:
    """Median ms of one training step of the benchmark model, and of the loss on its logits."""
    from spatial_entropy import AttentionCapture, create_model

    model = create_model("se_vit_small_patch8_64", num_classes=10, img_size=64, in_chans=3)
    model = model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    images = torch.rand(batch, 3, 64, 64, device=device)
    labels = torch.randint(0, 10, (batch,), device=device)
    capture = AttentionCapture(model)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        out = model(images)
        loss = (
            F.cross_entropy(out, labels)
            + 0.01 * spatial_entropy(capture.logits, capture.grid_shape).mean()
        )
        loss.backward()
        optimizer.step()

    step_ms = time_call(step, repeats, device)
    logits = capture.logits.detach()
    loss_ms = time_call(
        forward_backward(spatial_entropy, logits, capture.grid_shape), repeats, device
    )
    capture.remove()
    return step_ms, loss_ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=10, help="timed repeats of the batched loss")
    parser.add_argument("--reference-repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    out = args.out or Path(__file__).parent / "results" / f"loss_speed_{device}.json"

    cases = [(f"smooth {b}x{h} {g[0]}x{g[1]}", smooth_logits(b, h, g), g) for b, h, g in SHAPES]
    try:
        name, logits, grid = model_logits(128, device)
        cases.append((f"{name} 128x{logits.shape[1]} {grid[0]}x{grid[1]}", logits, grid))
    except ImportError:
        print("(model logits skipped: attention capture or models not available)")

    rows = []
    header = f"{'logits':<36} {'reference ms':>13} {'ours ms':>9} {'ratio':>8}"
    if device == "cuda":
        header += f" {'syncs':>6}"
    print(f"device: {device} ({device_name(device)}), torch {torch.__version__}")
    print(header)
    for label, logits, grid in cases:
        reference = time_call(
            forward_backward(reference_spatial_entropy, logits.to(device), grid),
            args.reference_repeats,
            device,
            warmup=1,
        )
        ours = time_call(
            forward_backward(spatial_entropy, logits.to(device), grid), args.repeats, device
        )
        row = {
            "logits": label,
            "shape": list(logits.shape),
            "grid": list(grid),
            "reference_ms": reference,
            "ours_ms": ours,
            "ratio": reference / ours,
        }
        line = f"{label:<36} {reference:>13.2f} {ours:>9.3f} {reference / ours:>7.1f}x"
        if device == "cuda":
            row["syncs_per_call"] = count_syncs(logits.to(device), grid)
            line += f" {row['syncs_per_call']:>6}"
        print(line)
        rows.append(row)

    result = {
        "device": device,
        "device_name": device_name(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "rows": rows,
    }
    try:
        step_ms, loss_ms = train_step_ms(device, 128, args.repeats)
        result["train_step"] = {
            "model": "se_vit_small_patch8_64",
            "batch": 128,
            "step_ms": step_ms,
            "loss_ms": loss_ms,
            "share": loss_ms / step_ms,
        }
        print(
            f"training step of se_vit_small_patch8_64, batch 128: {step_ms:.1f} ms; "
            f"loss fwd+bwd {loss_ms:.2f} ms = {100 * loss_ms / step_ms:.1f}% of the step"
        )
    except ImportError:
        print("(training-step share skipped: models not available)")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return platform.processor() or platform.machine()


if __name__ == "__main__":
    main()
