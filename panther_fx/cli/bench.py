"""``panther-fx bench NAME [ARGS...]``: run ``benchmarks/NAME.py`` of the source checkout with ARGS.

``panther-fx bench --list`` lists the benchmarks with their one-line descriptions; ``panther-fx bench NAME
--help`` shows a benchmark's own options."""

from __future__ import annotations

import argparse
import ast
import runpy
import sys
from pathlib import Path

from tabulate import tabulate

from ._common import CLIError

BENCHMARK_DIR = Path(__file__).resolve().parents[2] / "benchmarks"


def benchmarks() -> dict[str, Path]:
    """Name -> script of every ``benchmarks/*.py`` (none when panther_fx is not run from a checkout)."""
    if not BENCHMARK_DIR.is_dir():
        return {}
    return {p.stem: p for p in sorted(BENCHMARK_DIR.glob("*.py")) if not p.stem.startswith("_")}


def _summary(path: Path) -> str:
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("bench", help="run a benchmark script from benchmarks/ by name",
                              description=__doc__)
    p.add_argument("name", nargs="?", help="benchmark name (a file benchmarks/NAME.py)")
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments passed to the benchmark")
    p.add_argument("--list", action="store_true", help="list the benchmarks")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    found = benchmarks()
    if args.list or args.name is None:
        if not found:
            raise CLIError(f"no benchmarks found (expected {BENCHMARK_DIR}: run from a source checkout)")
        print(tabulate([(name, _summary(path)) for name, path in found.items()], headers=("benchmark", "description")))
        return
    if args.name not in found:
        raise CLIError(f"unknown benchmark {args.name!r} (available: {', '.join(found) or 'none'})")
    argv, path = sys.argv, list(sys.path)
    sys.argv = [str(found[args.name]), *args.args]
    sys.path.insert(0, str(found[args.name].parent))  # as `python benchmarks/NAME.py` has: siblings import
    try:
        runpy.run_path(str(found[args.name]), run_name="__main__")
    except SystemExit as e:
        if e.code not in (None, 0):
            raise CLIError(f"benchmark {args.name!r} exited with status {e.code}") from None
    finally:
        sys.argv, sys.path[:] = argv, path
