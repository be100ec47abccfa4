"""``panther-fx``: the command-line entry point. Each subcommand lives in its own module with
``add_parser(subparsers)``; user errors print one line and exit with status 2."""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings

from ..policy import PolicyError
from ._common import CLIError

SUBCOMMANDS = ["inspect", "demo", "policies", "bench", "info", "tune"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="panther-fx", description="Randomized linear algebra for PyTorch models.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in SUBCOMMANDS:
        importlib.import_module(f"panther_fx.cli.{name}").add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            args.run(args)
    except (CLIError, PolicyError, FileNotFoundError) as e:
        print(f"panther-fx {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
