"""``panther-fx inspect pkg.module:factory --policy P``: the per-layer report, without compiling."""

from __future__ import annotations

import argparse

from torch import nn

from ..passes import inspect_model
from ..policy import load_policy
from ._common import CLIError, load_object


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("inspect", help="print what a policy would do to a model (dry run)",
                              description=__doc__)
    p.add_argument("factory", help="'pkg.module:make_model', a callable returning an nn.Module")
    p.add_argument("--policy", required=True, help="policy TOML file")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    policy = load_policy(args.policy)
    model = load_object(args.factory)()
    if not isinstance(model, nn.Module):
        raise CLIError(f"{args.factory} returned {type(model).__name__}, not an nn.Module")
    print(inspect_model(model, policy).table())
