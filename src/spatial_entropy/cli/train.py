"""`spatial-entropy train`: train a ViT from a YAML config (single process or under torchrun)."""

from __future__ import annotations

import argparse

from spatial_entropy.config import config_keys, load_config


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a Vision Transformer, with or without the spatial-entropy regulariser",
        description=(
            "Train as the YAML config says and write RUN_DIR/{config.yaml, log.csv, "
            "metrics.json, model.safetensors, checkpoints/}. Under torchrun, runs "
            "DistributedDataParallel (batch_size is per process)."
        ),
        epilog="config keys: " + ", ".join(config_keys()),
    )
    parser.add_argument("--config", metavar="FILE.yaml", help="config file (default: built-ins)")
    parser.add_argument("--output", required=True, metavar="RUN_DIR", help="run directory")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key (dotted, YAML-typed: --set se.weight=0 --set lr=1e-3)",
    )
    parser.add_argument(
        "--resume",
        choices=["auto"],
        help="continue from RUN_DIR/checkpoints/latest if there is one",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # Imported here so that `spatial-entropy --help` does not load torch and timm.
    from spatial_entropy.engine import train

    # Errors reach `spatial_entropy.cli.main`, which prints them as one line.
    config = load_config(args.config, args.overrides)
    metrics = train(config, args.output, resume=args.resume == "auto")
    print(
        f"top1 {metrics['top1']:.2f}  top5 {metrics['top5']:.2f}  loss {metrics['loss']:.4f}  "
        f"({metrics['steps']} steps, {metrics['train_time_s']:.0f} s) -> {args.output}"
    )
    return 0
