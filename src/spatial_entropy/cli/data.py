"""`spatial-entropy data info`: size, classes and a sample grid of a dataset split."""

from __future__ import annotations

import argparse
from typing import Any

from spatial_entropy.choices import SPLITS
from spatial_entropy.config import parse_override

PROG = "spatial-entropy data info"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("data", help="inspect datasets")
    actions = parser.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    info = actions.add_parser(
        "info",
        help="print 'N images, C classes' for a split; optionally draw a sample grid",
        description=(
            "Load a split as training would (generating and caching cluttered-fashion on first "
            "use), print its size and classes, and with --grid write a PNG of sample images."
        ),
    )
    info.add_argument("name", metavar="NAME", help="dataset name, e.g. cluttered-fashion")
    info.add_argument("--data-path", help="folder holding the dataset's files")
    info.add_argument("--split", default="train", choices=SPLITS)
    info.add_argument(
        "--set",
        dest="options",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="dataset option, YAML-typed (--set distractors=2 --set in_chans=3)",
    )
    info.add_argument("--img-size", type=int, help="output side in pixels (default: native/224)")
    subset = info.add_mutually_exclusive_group()
    subset.add_argument("--n-per-class", type=int, help="stratified subset: items per class")
    subset.add_argument("--fraction", type=float, help="stratified subset: fraction per class")
    info.add_argument("--seed", type=int, default=0, help="subset seed (default 0)")
    info.add_argument(
        "--skip-bad", action="store_true", help="skip bad files and report their count"
    )
    info.add_argument(
        "--verify", action="store_true", help="decode every image now, failing on the first bad one"
    )
    info.add_argument("--grid", metavar="OUT.png", help="write a grid of sample images here")
    info.add_argument("--grid-count", type=int, default=16, help="images in the grid (default 16)")
    info.add_argument(
        "--masks",
        action="store_true",
        help="load the object masks: report how many images have one and the mean object "
        "share, and outline them in the grid",
    )
    info.set_defaults(func=run_info)


def run_info(args: argparse.Namespace) -> int:
    # Imported here so that `spatial-entropy --help` does not load torch and timm.
    from spatial_entropy.data import build_dataset
    from spatial_entropy.visualize import dataset_figure, save_figure

    try:
        if args.grid_count < 1:  # checked before the (possibly slow) loading
            raise ValueError(f"--grid-count must be >= 1, got {args.grid_count}")
        options = dict(parse_override(item) for item in args.options)
        dataset = build_dataset(
            args.name,
            args.split,
            data_path=args.data_path,
            img_size=args.img_size,
            is_train=False,
            n_per_class=args.n_per_class,
            fraction=args.fraction,
            seed=args.seed,
            with_masks=args.masks,
            skip_bad=args.skip_bad,
            options=options,
        )
        if args.verify and not args.skip_bad:
            dataset.verify()
        print(f"{len(dataset)} images, {dataset.num_classes} classes")
        print(_details(dataset, args.split))
        if args.masks:
            print(_mask_summary(dataset))
        if args.grid:
            save_figure(dataset_figure(dataset, args.grid_count), args.grid)
            print(f"grid: {args.grid}")
    except (ValueError, OSError) as exc:
        raise SystemExit(f"{PROG}: {exc}") from exc
    return 0


def _details(dataset: Any, split: str) -> str:
    counts = [0] * dataset.num_classes
    for label in dataset.targets:
        counts[label] += 1
    lines = [
        f"split {split}; in_chans {dataset.in_chans}; mean {tuple(dataset.mean)}; "
        f"std {tuple(dataset.std)}",
        f"images per class: min {min(counts, default=0)}, max {max(counts, default=0)}",
    ]
    if dataset.skipped:
        lines.append(f"skipped {dataset.skipped} bad item(s); first: {dataset.skipped_reasons[0]}")
    return "\n".join(lines)


def _mask_summary(dataset: Any) -> str:
    """How many items carry a mask, and the mean share of object pixels among the non-void
    pixels of each mask (after the evaluation transform, as the Jaccard sees them)."""
    from spatial_entropy.evaluation import object_masks

    shares = []
    for index in range(len(dataset)):
        objects, valid = object_masks(dataset[index][2])
        inside = (objects.any(dim=0) & valid).sum().item()
        shares.append(inside / max(valid.sum().item(), 1))
    empty = sum(share == 0 for share in shares)
    mean = sum(shares) / len(shares) if shares else float("nan")
    return (
        f"masks: {len(shares)} images with masks; mean object share {mean:.4f} "
        f"(object / non-void pixels); {empty} without object pixels"
    )
