"""`spatial-entropy evaluate`: accuracy and attention statistics of a run on a dataset split."""

from __future__ import annotations

import argparse
import sys

from spatial_entropy.choices import DEVICES
from spatial_entropy.config import parse_override

PROG = "spatial-entropy evaluate"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="evaluate a trained run",
        description=(
            "Evaluate RUN_DIR/model.safetensors (or --checkpoint) on a split of the run's "
            "dataset (--split train: the images it trained on), or of other data (--data-path, "
            "--dataset); print the metrics and write RUN_DIR/eval.json (top1, top5 in percent, "
            "loss; with --attention the attention statistics)."
        ),
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a directory written by `train`")
    parser.add_argument("--split", default="test", help="dataset split (default: test)")
    parser.add_argument(
        "--checkpoint",
        metavar="FILE",
        help="weights to evaluate: a .safetensors file or checkpoints/step_*.pt",
    )
    parser.add_argument("--device", default="auto", choices=DEVICES)
    parser.add_argument(
        "--attention",
        action="store_true",
        help="also the attention statistics: jaccard (datasets with object masks), se_mean, "
        "regions_mean, single_region_share",
    )
    parser.add_argument(
        "--mass", type=float, default=0.6, help="attention mass kept for the Jaccard (default 0.6)"
    )
    parser.add_argument(
        "--dataset",
        metavar="NAME",
        help="evaluate on this dataset instead of the run's (e.g. imagefolder); accuracy only "
        "when the run has its classes",
    )
    parser.add_argument(
        "--data-path", metavar="DIR", help="the data's folder, instead of the run's"
    )
    parser.add_argument(
        "--set",
        dest="options",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="dataset option, YAML-typed (--set void_value=255 --set masks_path=DIR)",
    )
    parser.add_argument(
        "--skip-bad", action="store_true", help="skip bad items (e.g. a missing mask) and go on"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # Imported here so that `spatial-entropy --help` does not load torch and timm.
    from spatial_entropy.evaluation import evaluate_run
    from spatial_entropy.runs import to_json

    try:
        metrics = evaluate_run(
            args.run_dir, args.split, args.checkpoint, args.device,
            attention=args.attention, mass=args.mass, dataset=args.dataset,
            data_path=args.data_path,
            data_options=dict(parse_override(item) for item in args.options),
            skip_bad=args.skip_bad,
        )  # fmt: skip
    except (OSError, ValueError) as exc:
        raise SystemExit(f"{PROG}: {exc}") from exc
    for metric, reason in metrics.get("omitted", {}).items():
        print(f"{PROG}: no {metric}: {reason}", file=sys.stderr)
    print(to_json(metrics))
    return 0
