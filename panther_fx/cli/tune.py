"""``panther-fx tune pkg.module:make_model --eval pkg.module:evaluate --min-quality Q --out policy.toml``:
search per-layer ranks for the cheapest policy whose evaluate(model) >= Q, and write it as TOML."""

from __future__ import annotations

import argparse
from collections.abc import Mapping

from ..tuner import OBJECTIVES, TuneError, tune
from ._common import CLIError, build_model, load_object, positive_int


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("tune", help="search a policy under a quality constraint (Optuna)",
                              description=__doc__)
    p.add_argument("factory", help="'pkg.module:make_model', a callable returning the dense nn.Module")
    p.add_argument("--eval", required=True, dest="evaluate",
                   help="'pkg.module:evaluate', evaluate(model) -> float, higher is better")
    p.add_argument("--min-quality", required=True, type=float, help="lowest acceptable evaluate(model)")
    p.add_argument("--objective", choices=OBJECTIVES, default="params", help="cost to minimize (default: params)")
    p.add_argument("--trials", type=positive_int, default=50, help="trials to run (added to a resumed study)")
    p.add_argument("--out", required=True, help="policy TOML file to write")
    p.add_argument("--storage", help="Optuna RDB URL, e.g. sqlite:///study.db (resumable)")
    p.add_argument("--study-name", help="study name in --storage (default: derived from the factory)")
    p.add_argument("--inputs", help="'pkg.module:make_inputs' returning the example inputs for latency and "
                                    "memory (required for --objective latency/memory)")
    p.add_argument("--space", help="'pkg.module:SPACE', a {pattern: choices} dict (default: every Linear and Conv2d)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=run)


def _call_or_value(spec: str):
    obj = load_object(spec)
    return obj() if callable(obj) else obj


def run(args: argparse.Namespace) -> None:
    if args.objective != "params" and not args.inputs:
        raise CLIError(f"--objective {args.objective} is measured by running the model: give --inputs")
    model = build_model(args.factory)
    evaluate = load_object(args.evaluate)
    if not callable(evaluate):
        raise CLIError(f"--eval {args.evaluate} is a {type(evaluate).__name__}, not a callable evaluate(model)")
    example_inputs = _call_or_value(args.inputs) if args.inputs else None
    space = _call_or_value(args.space) if args.space else None
    if space is not None and not isinstance(space, Mapping):
        raise CLIError(f"--space {args.space} must give a dict {{pattern: choices}}, not {type(space).__name__}")
    study_name = args.study_name or (f"panther-tune:{args.factory}" if args.storage else None)
    try:
        result = tune(model, evaluate, example_inputs=example_inputs, min_quality=args.min_quality,
                      objective=args.objective, space=space, n_trials=args.trials, storage=args.storage,
                      study_name=study_name, seed=args.seed)
    except TuneError as e:
        raise CLIError(str(e)) from None
    print(result.table(result.pareto()))
    path = result.write(args.out)
    best, dense = result.best, result.dense
    print(f"{'interrupted; ' if result.interrupted else ''}best: trial {best.number}, quality {best.quality:.6g} "
          f"(dense {dense.quality:.6g}), params {best.params:,} of {dense.params:,} -> {path}")
