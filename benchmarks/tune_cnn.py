"""The tuner on Conv2d layers with real data: per-layer conv ranks of a small Fashion-MNIST CNN.

1. Train ``SmallCNN`` (benchmarks/conv_quality.py) on the first 55k images of the official training split.
2. ``panther_fx.tune`` its convs 2-4 (svd, ranks 'auto'), quality = accuracy on the held-out last 5k training
   images after post-training compression (no fine-tune), objective = parameters, min_quality = dense - margin.
3. Report accuracy on the official 10k test split for dense, the tuned policy and uniform svd ranks, with the
   conv weights each keeps.

    python benchmarks/tune_cnn.py --epochs 2 --trials 25 --margin 2

CPU, float32; the trials swap modules eagerly (the tuner's path), so no compilation is involved.
"""

from __future__ import annotations

import argparse
import time

import optuna
import torch
from tabulate import tabulate

import panther_fx
from conv_quality import SmallCNN, accuracy, load_split, policy_for, train


def conv_weights(model: torch.nn.Module) -> int:
    return sum(p.numel() for name, p in model.named_parameters() if name.startswith("conv") and name.endswith(
        ("weight", "V", "U")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--trials", type=int, default=25)
    parser.add_argument("--margin", type=float, default=2.0, help="accuracy points below dense allowed")
    parser.add_argument("--uniform", type=float, nargs="+", default=[0.75, 0.5, 0.25])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    start = time.perf_counter()

    x, y = load_split("train")
    fit, held_out = (x[:55000], y[:55000]), (x[55000:], y[55000:])
    test = load_split("t10k")
    torch.manual_seed(0)  # as conv_quality.py: SmallCNN's default init draws from the global RNG
    model = SmallCNN()
    train(model, fit, args.epochs, lr=3e-3, batch=128, seed=0, label="dense")
    dense_tune = accuracy(model, held_out)

    result = panther_fx.tune(model, lambda m: accuracy(m, held_out), example_inputs=None,
                             min_quality=dense_tune - args.margin, space={"re:conv[234]": "auto"},
                             n_trials=args.trials, seed=0)
    rows = [("dense", conv_weights(model), dense_tune, accuracy(model, test))]
    tuned, report = panther_fx.convert(model, result.policy, inplace=False)
    label = ", ".join(f"{r.path}:{r.rank}" for r in report.rewritten) or "all dense"
    rows.append((f"tuned ({label})", conv_weights(tuned), accuracy(tuned, held_out), accuracy(tuned, test)))
    for rank in args.uniform:
        uniform, _ = panther_fx.convert(model, policy_for(rank), inplace=False)
        rows.append((f"uniform svd {rank}", conv_weights(uniform), accuracy(uniform, held_out), accuracy(uniform, test)))
    dense_weights = rows[0][1]
    table = [(name, f"{w:,} ({w / dense_weights:.1%})", f"{a:.2f}", f"{t:.2f}") for name, w, a, t in rows]
    print(tabulate(table, headers=("policy", "conv weights", "held-out acc %", "test acc %"), tablefmt="github"))
    print(f"\n{len(result.rows)} trials, min_quality {dense_tune - args.margin:.2f}; "
          f"{time.perf_counter() - start:.0f} s in all")


if __name__ == "__main__":
    main()
