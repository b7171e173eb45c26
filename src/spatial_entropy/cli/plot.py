"""`spatial-entropy plot`: training curves (loss, spatial entropy, λ, top-1) of runs as a PNG."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "plot",
        help="plot loss, spatial entropy, λ and top-1 per epoch from runs' log.csv",
        description=(
            "Read RUN_DIR/log.csv of one or more runs and draw loss, spatial entropy, the "
            "regulariser weight λ and top-1 per epoch, the runs overlaid."
        ),
    )
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="directories of `train`")
    parser.add_argument(
        "--out", metavar="FILE.png", help="output image (default: RUN_DIR/training.png)"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # Imported here so that `spatial-entropy --help` does not load torch and timm.
    from spatial_entropy.visualize import runs_training_figure, save_figure

    if args.out is None and len(args.run_dirs) > 1:
        raise SystemExit("spatial-entropy plot: give --out when plotting several runs")
    out = args.out or Path(args.run_dirs[0]) / "training.png"
    try:
        fig, missing = runs_training_figure(args.run_dirs)
        save_figure(fig, out)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"spatial-entropy plot: {exc}") from exc
    if missing:
        print(f"note: not in any log.csv, so not drawn: {', '.join(missing)}", file=sys.stderr)
    print(f"wrote {out}")
    return 0
