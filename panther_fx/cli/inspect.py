"""``panther-fx inspect pkg.module:factory --policy P``: the per-layer report, without compiling."""

from __future__ import annotations

import argparse

from ..passes import inspect_model
from ..policy import load_policy
from ._common import build_model
from .policies import resolve_policy


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("inspect", help="print what a policy would do to a model (dry run)",
                              description=__doc__)
    p.add_argument("factory", help="'pkg.module:make_model', a callable returning an nn.Module")
    p.add_argument("--policy", required=True, help="policy TOML file or shipped policy name (panther-fx policies)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    policy = load_policy(resolve_policy(args.policy))
    model = build_model(args.factory)
    print(inspect_model(model, policy).table())
