"""The `spatial-entropy` command: parses arguments, then calls the library."""

from __future__ import annotations

import argparse
import importlib
import sys

from spatial_entropy import __version__

# Each module registers one subcommand through `register(subparsers)`; the function it sets
# as `func` receives the parsed arguments and returns an exit code.
COMMAND_MODULES: tuple[str, ...] = ("train", "evaluate", "data", "attention", "plot")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spatial-entropy",
        description="Train Vision Transformers with a spatial-entropy regulariser.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"spatial_entropy.cli.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return 2
    return int(args.func(args) or 0)
