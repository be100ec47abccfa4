"""``panther-fx policies``: the policy files shipped with panther_fx, one line each.

A shipped policy can be named without its directory or ``.toml`` wherever the CLI takes a policy
(``panther-fx demo --policy minilm-asvd``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from tabulate import tabulate

from ._common import CLIError

__all__ = ["POLICY_DIR", "shipped_policies", "describe", "resolve_policy", "add_parser"]

POLICY_DIR = Path(__file__).resolve().parents[1] / "policies"


def shipped_policies() -> dict[str, Path]:
    """Name -> path of every ``panther_fx/policies/*.toml``."""
    return {p.stem: p for p in sorted(POLICY_DIR.glob("*.toml"))}


def describe(path: Path) -> str:
    """The policy's one-line description: its first ``#`` comment line."""
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("#").strip()
    return ""


def resolve_policy(spec: str) -> Path:
    """A shipped policy name (``minilm-svd``) or a path to a TOML file."""
    shipped = shipped_policies()
    if spec in shipped:
        return shipped[spec]
    path = Path(spec)
    if path.is_file():
        return path
    raise CLIError(f"no policy file {spec!r} (shipped policies: {', '.join(shipped) or 'none'})")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("policies", help="list the policy files shipped with panther_fx",
                              description=__doc__)
    p.add_argument("--path", action="store_true", help="also print each file's path")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    rows = [(name, describe(path)) + ((str(path),) if args.path else ())
            for name, path in shipped_policies().items()]
    print(tabulate(rows, headers=("policy", "description") + (("path",) if args.path else ())))
