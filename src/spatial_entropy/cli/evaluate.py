"""`spatial-entropy evaluate`: top-1/top-5/loss of a run's weights on a split of its dataset."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="evaluate a trained run",
        description=(
            "Evaluate RUN_DIR/model.safetensors (or --checkpoint) on a split of the run's "
            "dataset; print the metrics and write RUN_DIR/eval.json (top1, top5 in percent, loss)."
        ),
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a directory written by `train`")
    parser.add_argument("--split", default="test", help="dataset split (default: test)")
    parser.add_argument(
        "--checkpoint",
        metavar="FILE",
        help="weights to evaluate: a .safetensors file or checkpoints/step_*.pt",
    )
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument(
        "--attention",
        action="store_true",
        help="also the attention statistics: jaccard (datasets with object masks), se_mean, "
        "regions_mean, single_region_share",
    )
    parser.add_argument(
        "--mass", type=float, default=0.6, help="attention mass kept for the Jaccard (default 0.6)"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # Imported here so that `spatial-entropy --help` does not load torch and timm.
    from spatial_entropy.evaluation import evaluate_run
    from spatial_entropy.runs import to_json

    try:
        metrics = evaluate_run(
            args.run_dir, args.split, args.checkpoint, args.device,
            attention=args.attention, mass=args.mass,
        )  # fmt: skip
    except (OSError, ValueError) as exc:
        raise SystemExit(f"spatial-entropy evaluate: {exc}") from exc
    print(to_json(metrics))
    return 0
