"""The `spatial-entropy` command: parses arguments, then calls the library."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from spatial_entropy import __version__

# Each module registers one subcommand through `register(subparsers)`; the function it sets
# as `func` receives the parsed arguments and returns an exit code.
COMMAND_MODULES: tuple[str, ...] = ("train", "evaluate", "data", "attention", "plot")

DEBUG_ENV = "SPATIAL_ENTROPY_DEBUG"
"""Environment variable that, set to anything but empty or 0, works as ``--debug``."""

_DEBUG_HELP = f"show the full traceback of an error (or set {DEBUG_ENV}=1)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spatial-entropy",
        description="Train Vision Transformers with a spatial-entropy regulariser.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--debug", action="store_true", help=_DEBUG_HELP)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"spatial_entropy.cli.{name}").register(subparsers)
    _add_debug_flag(subparsers)
    return parser


def _add_debug_flag(subparsers: argparse._SubParsersAction) -> None:
    """Accept ``--debug`` after the subcommand too (``train ... --debug``), at every depth."""
    for parser in set(subparsers.choices.values()):
        nested = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        for action in nested:
            _add_debug_flag(action)
        if not nested:
            # SUPPRESS: an absent subcommand flag must not reset a top-level `--debug`
            parser.add_argument(
                "--debug", action="store_true", default=argparse.SUPPRESS, help=_DEBUG_HELP
            )


def _one_line(exc: BaseException) -> str:
    """The message of ``exc`` on one line; the exception type where the message alone is not
    an explanation (anything but a ValueError or OSError, which our code raises for bad input)."""
    message = " ".join(str(exc).split())
    if isinstance(exc, (ValueError, OSError)) and message:
        return message
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    """Run ``spatial-entropy ARGV``; return the exit code.

    An error ends in one line on stderr (``spatial-entropy COMMAND: message``) and exit code 1,
    Ctrl-C in one line and exit code 130 (for ``train``, with the command that continues the
    run); with ``--debug`` or ``SPATIAL_ENTROPY_DEBUG=1`` the exception propagates with its
    traceback.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return 2
    debug = args.debug or os.environ.get(DEBUG_ENV, "").strip() not in ("", "0")
    try:
        return int(args.func(args) or 0)
    except SystemExit as exc:
        # Commands that word their own one-line message raise SystemExit(message) from the cause.
        if debug and exc.__cause__ is not None:
            raise exc.__cause__ from None
        if not isinstance(exc.code, str):
            raise
        print(" ".join(exc.code.split()), file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C: one line, and how to continue a training run
        if debug:
            raise
        hint = ""
        if args.command == "train":
            hint = (f"; `{parser.prog} train --output {args.output} --resume auto` continues from "
                    "its last checkpoint")  # fmt: skip
        print(f"{parser.prog} {args.command}: interrupted{hint}", file=sys.stderr)
        return 130
    except Exception as exc:
        if debug:
            raise
        print(f"{parser.prog} {args.command}: {_one_line(exc)}", file=sys.stderr)
        return 1
