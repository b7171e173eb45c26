"""Where does the [CLS] attention go? Object, distractor fragments, or the rest of the scene.

For trained cluttered-fashion runs (e.g. the data-efficiency benchmark's run directories), the
last block's [CLS] attention over the patches (renormalised to sum to 1 over the patches) is
spread uniformly over each patch's pixels and split into three shares on the 2,000-image test
set: on the object mask, on the distractor fragments' windows (outside the object) and on the
rest of the scene. Shares are averaged over heads and images; each run's shares sum to 1. The
areas of the same regions are reported beside them: a share above its area means attention
concentrates there. Per head, also: the foreground the loss sees (the patches whose logit is
above the map's mean) as a share of the patches, its number of 8-connected regions, and the
share of patches that hold 60 % of the attention (the Jaccard's mask; large for a diffuse
head). The table gives the means over heads and the most diffuse head's area and regions.

    python benchmarks/attention_mass.py runs/data_efficiency/n50_e50 runs/data_efficiency/n100_e25

Looks for ARM/seedK run directories under each directory given; writes
benchmarks/results/attention_mass.{md,json} (or --out STEM).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from spatial_entropy import AttentionCapture
from spatial_entropy.entropy import foreground_weights
from spatial_entropy.evaluation import attention_masks, map_statistics
from spatial_entropy.runs import load_run

RESULTS = Path(__file__).parent / "results"


def mass_shares(
    attention: torch.Tensor,
    grid_shape: tuple[int, int],
    masks: torch.Tensor,
    distractors: torch.Tensor,
) -> torch.Tensor:
    """Per image, the attention share on the object, on distractors and on the rest.

    Args:
        attention: ``(B, heads, gh * gw)`` non-negative attention over patches.
        grid_shape: ``(gh, gw)``.
        masks: ``(B, H, W)`` bool object masks; ``H, W`` multiples of the grid.
        distractors: ``(B, H, W)`` bool distractor windows.

    Returns:
        ``(B, 3)``: object, distractor (outside the object) and rest shares, mean over heads.
    """
    b, heads, _ = attention.shape
    h, w = masks.shape[-2:]
    gh, gw = grid_shape
    if h % gh or w % gw:
        raise ValueError(f"image {h}x{w} is not a whole number of {gh}x{gw} patches")
    maps = attention.reshape(b, heads, gh, gw).double()
    maps = maps / maps.sum(dim=(-2, -1), keepdim=True)
    # each patch's mass spread evenly over its pixels
    pixels = F.interpolate(maps, size=(h, w), mode="nearest") / ((h // gh) * (w // gw))
    obj = masks[:, None].to(pixels.dtype)
    dis = (distractors & ~masks)[:, None].to(pixels.dtype)
    on_object = (pixels * obj).sum(dim=(-2, -1))
    on_distractors = (pixels * dis).sum(dim=(-2, -1))
    shares = torch.stack([on_object, on_distractors, 1 - on_object - on_distractors], dim=-1)
    return shares.mean(dim=1)


def head_statistics(
    logits: torch.Tensor, attention: torch.Tensor, grid_shape: tuple[int, int], mass: float = 0.6
) -> torch.Tensor:
    """Per head, summed over the images: the share of patches in the loss's foreground (logit
    above the map's mean), its number of 8-connected regions, and the share of patches that
    hold ``mass`` of the attention (the Jaccard's mask: large for a diffuse head).

    Args:
        logits: ``(B, heads, gh * gw)`` [CLS] logits over the patches.
        attention: ``(B, heads, gh * gw)`` the same maps after the softmax.
        grid_shape: ``(gh, gw)``.

    Returns:
        float64 ``(3, heads)``: foreground shares, region counts and mass areas, each summed
        over ``B``.
    """
    foreground, _ = foreground_weights(logits)
    _, regions = map_statistics(logits, grid_shape)
    area = attention_masks(attention, grid_shape, mass=mass).double().mean(dim=(-2, -1))
    sums = [foreground.double().mean(dim=-1), regions.double(), area]
    return torch.stack([s.sum(0) for s in sums])


def distractor_windows(boxes: torch.Tensor, canvas: int, size: int) -> torch.Tensor:
    """``(B, K, 4)`` (x0, y0, x1, y1) canvas boxes -> ``(B, size, size)`` bool union mask."""
    scale = size / canvas
    coords = (torch.arange(size, dtype=torch.float64) + 0.5) / scale  # pixel centres, canvas units
    x0, y0, x1, y1 = (boxes[..., i, None].double() for i in range(4))
    inside_x = (coords >= x0) & (coords < x1)  # (B, K, size)
    inside_y = (coords >= y0) & (coords < y1)
    return (inside_y[..., :, None] & inside_x[..., None, :]).any(dim=1)


@torch.no_grad()
def run_shares(run_dir: Path, batch_size: int = 250) -> dict:
    model, dataset, config = load_run(run_dir, "test")
    arrays = getattr(dataset, "arrays", None)
    if arrays is None or "distractor_boxes" not in arrays:
        raise ValueError(f"{run_dir}: needs a cluttered-fashion run (distractor boxes)")
    boxes = torch.as_tensor(arrays["distractor_boxes"].astype("int64"))
    canvas = dataset.native_size
    totals, areas, seen = torch.zeros(3, dtype=torch.float64), torch.zeros(2), 0
    heads = 0
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    with AttentionCapture(model) as capture:
        for images, _, masks in loader:
            model(images)
            size = masks.shape[-1]
            windows = distractor_windows(boxes[seen : seen + len(images)], canvas, size)
            totals += mass_shares(capture.attention, capture.grid_shape, masks, windows).sum(0)
            heads = heads + head_statistics(capture.logits, capture.attention, capture.grid_shape)
            areas += torch.stack(
                [masks.float().mean(dim=(-2, -1)), (windows & ~masks).float().mean(dim=(-2, -1))],
                dim=-1,
            ).sum(0)
            seen += len(images)
    shares = (totals / seen).tolist()
    return {
        "run": str(run_dir),
        "n_per_class": config.n_per_class,
        "arm": run_dir.parent.name,
        "seed": config.seed,
        "object": shares[0],
        "distractors": shares[1],
        "rest": shares[2],
        "object_area": float(areas[0] / seen),
        "distractor_area": float(areas[1] / seen),
        "foreground_per_head": (heads[0] / seen).tolist(),
        "regions_per_head": (heads[1] / seen).tolist(),
        "mass_area_per_head": (heads[2] / seen).tolist(),
    }


def table(results: list[dict]) -> str:
    groups: dict[tuple[int, str], list[dict]] = {}
    for r in results:
        groups.setdefault((r["n_per_class"], r["arm"]), []).append(r)
    lines = [
        "| n / class | arm | seeds | on object | on distractors | on the rest "
        "| object area | distractor area | loss foreground | 60 % mass area "
        "| most diffuse head (regions) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (n, arm), runs in sorted(groups.items()):
        cells = []
        for key in ("object", "distractors", "rest"):
            values = [r[key] for r in runs]
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.fmean(values):.3f} ± {std:.3f}")
        area = [statistics.fmean(r[k] for r in runs) for k in ("object_area", "distractor_area")]
        lines.append(
            f"| {n} | {arm} | {len(runs)} | " + " | ".join(cells) + f" | {area[0]:.3f} "
            f"| {area[1]:.3f} | {_head_cells(runs)} |"
        )
    return "\n".join(lines)


def _head_cells(runs: list[dict]) -> str:
    """The loss's foreground share and the 60 %-mass area, means over heads, and the most
    diffuse head's (largest mass area, per run) area and regions; means over the runs (blank
    for records made before these were measured)."""
    runs = [r for r in runs if "mass_area_per_head" in r]
    if not runs:
        return " |  | "
    foreground, area, widest, regions = [], [], [], []
    for r in runs:
        areas = r["mass_area_per_head"]
        head = max(range(len(areas)), key=areas.__getitem__)
        foreground.append(statistics.fmean(r["foreground_per_head"]))
        area.append(statistics.fmean(areas))
        widest.append(areas[head])
        regions.append(r["regions_per_head"][head])
    return (f"{statistics.fmean(foreground):.3f} | {statistics.fmean(area):.3f} | "
            f"{statistics.fmean(widest):.3f} ({statistics.fmean(regions):.2f})")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dirs", type=Path, nargs="+", help="folders holding ARM/seedK runs")
    parser.add_argument("--out", type=Path, default=RESULTS / "attention_mass")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    runs = sorted(p.parent for d in args.dirs for p in d.glob("*/seed*/model.safetensors"))
    if not runs:
        parser.error(f"no finished runs (ARM/seedK/model.safetensors) under {args.dirs}")
    results = []
    for i, run in enumerate(runs, 1):
        results.append(run_shares(run))
        r = results[-1]
        print(f"[{i}/{len(runs)}] {run}: object {r['object']:.3f}, distractors "
              f"{r['distractors']:.3f}, rest {r['rest']:.3f}", flush=True)  # fmt: skip
    report = table(results)
    print(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text(report + "\n")
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}.{{md,json}}")


if __name__ == "__main__":
    main()
