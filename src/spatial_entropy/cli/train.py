"""`spatial-entropy train`: train a ViT from a YAML config (single process or under torchrun)."""

from __future__ import annotations

import argparse

from spatial_entropy.config import RESUMABLE_KEYS, config_keys, load_config


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a Vision Transformer, with or without the spatial-entropy regulariser",
        description=(
            "Train as the YAML config says and write RUN_DIR/{config.yaml, log.csv, "
            "metrics.json, model.safetensors, checkpoints/}; a RUN_DIR that holds a run is "
            "refused unless --resume auto or --overwrite. Under torchrun, runs "
            "DistributedDataParallel (batch_size is per process)."
        ),
        epilog="config keys: " + ", ".join(config_keys()),
    )
    parser.add_argument(
        "--config",
        metavar="FILE.yaml",
        help="config file (default: RUN_DIR/config.yaml with --resume auto, else built-ins)",
    )
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
        "--sweep",
        action="append",
        default=[],
        metavar="KEY=V1,V2,...",
        help="train one run per value (per combination, when repeated) as one vmapped step, "
        "written to RUN_DIR/KEY=VALUE; keys se.* and drloc.* only (a regulariser ablation or "
        "a λ sweep: on a GPU K runs cost little more than one); the group's checkpoint is "
        "RUN_DIR/group.pt (--resume auto continues it)",
    )
    start = parser.add_mutually_exclusive_group()
    start.add_argument(
        "--resume",
        choices=["auto"],
        help="continue the run in RUN_DIR from its latest checkpoint if there is one (else "
        "start it); --set may change only: " + ", ".join(RESUMABLE_KEYS),
    )
    start.add_argument(
        "--overwrite",
        action="store_true",
        help="RUN_DIR holds a run: delete its files (config.yaml, log.csv, metrics.json, "
        "eval.json, weights, checkpoints/, tensorboard/) and start again; other files stay",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # Imported here so that `spatial-entropy --help` does not load torch and timm.
    from spatial_entropy.engine import train
    from spatial_entropy.runs import RunPaths

    if args.sweep:
        return _sweep(args)
    resume = args.resume == "auto"
    path = args.config
    if path is None and resume and RunPaths(args.output).config.is_file():
        path = RunPaths(args.output).config  # the run's own config, changed only by --set
    # Errors reach `spatial_entropy.cli.main`, which prints them as one line.
    config = load_config(path, args.overrides)
    metrics = train(config, args.output, resume=resume, overwrite=args.overwrite)
    print(
        f"top1 {metrics['top1']:.2f}  top5 {metrics['top5']:.2f}  loss {metrics['loss']:.4f}  "
        f"({metrics['steps']} steps, {metrics['train_time_s']:.0f} s) -> {args.output}"
    )
    return 0


def _sweep(args: argparse.Namespace) -> int:
    """``--sweep``: every combination of the swept values as one group (spatial_entropy.grouped)."""
    import itertools
    from pathlib import Path

    from spatial_entropy.grouped import GROUP_KEYS, train_group

    axes = []
    for item in args.sweep:
        key, sep, values = item.partition("=")
        if not sep or not key or not values:
            raise ValueError(f"--sweep expects KEY=V1,V2,..., got {item!r}")
        if not key.startswith(GROUP_KEYS):
            raise ValueError(f"--sweep sweeps se.* and drloc.* keys only (runs of one group), "
                             f"got {key!r}; train other settings as separate runs")  # fmt: skip
        axes.append([f"{key}={value}" for value in values.split(",")])
    combos = list(itertools.product(*axes))
    configs = [load_config(args.config, [*args.overrides, *combo]) for combo in combos]
    dirs = [Path(args.output) / "_".join(combo) for combo in combos]
    checkpoint = Path(args.output) / "group.pt"
    resume = args.resume == "auto"
    results = train_group(
        configs, dirs, checkpoint=checkpoint, resume=resume, overwrite=args.overwrite
    )
    for run_dir, metrics in zip(dirs, results, strict=True):
        print(f"top1 {metrics['top1']:.2f}  top5 {metrics['top5']:.2f}  loss "
              f"{metrics['loss']:.4f}  ({metrics['steps']} steps) -> {run_dir}")  # fmt: skip
    return 0
