"""Acceptance run of the autotuner: all-MiniLM-L6-v2 on Wikipedia description -> article retrieval.

Evaluates the dense model and uniform-rank svd policies, then tunes per-layer ranks of the 36 encoder
Linears for the fewest parameters at Recall@1 >= the target, and re-checks the best uniform and the tuned
policy on held-out pairs. Writes a markdown table, a JSON record, the tuned policy and the Pareto plot.

    python benchmarks/tune_minilm.py --pairs 400 --heldout 400 --match-uniform 256 --trials 18   # docs/tuning.md

CPU, float32. Recall@1 on the tuning pairs is exact for that set (no sampling noise), the held-out pairs
check that the policy was not fitted to them.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from panther_fx.evaluation import RetrievalTask, load_minilm, load_wiki_pairs  # noqa: E402
from panther_fx.passes import FactorCache  # noqa: E402
from panther_fx.policy import Policy  # noqa: E402
from panther_fx.tuner import tune  # noqa: E402
from panther_fx.tuner.measure import applied  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def recall(task: RetrievalTask, model: torch.nn.Module) -> float:
    return task.evaluate(model).recall_at_1


def uniform(model, task, ranks, cache):
    """(rank, Recall@1, Linear weight params) of {"defaults": {"method": "svd", "rank": r}}."""
    rows = []
    for r in ranks:
        with applied(model, Policy.load({"defaults": {"method": "svd", "rank": r}}), cache) as report:
            rows.append({"rank": r, "recall": recall(task, model), "layer_params": report.params()[1]})
        print("uniform", rows[-1], flush=True)
    return rows


def plot(result, baselines, dense_params, min_quality, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    rows = result.rows
    ax.scatter([r.layer_params / dense_params for r in rows], [r.quality for r in rows], s=18, c="0.6",
               label="trials")
    front = result.pareto()
    ax.plot([r.layer_params / dense_params for r in front], [r.quality for r in front], "-o", c="C0", ms=4,
            label="tuned Pareto front")
    ax.plot([b["layer_params"] / dense_params for b in baselines], [b["recall"] for b in baselines], "s--",
            c="C1", label="uniform rank")
    for b in baselines:
        ax.annotate(f"r={b['rank']}", (b["layer_params"] / dense_params, b["recall"]), textcoords="offset points",
                    xytext=(4, -10), fontsize=8, color="C1")
    best = result.best
    ax.scatter([best.layer_params / dense_params], [best.quality], marker="*", s=180, c="C3", zorder=5,
               label="tuned policy")
    ax.axhline(min_quality, ls=":", c="k", lw=1, label=f"min Recall@1 = {min_quality:.3f}")
    ax.set_xlabel("encoder Linear weight parameters kept (fraction of dense)")
    ax.set_ylabel("Recall@1 (tuning pairs)")
    ax.set_title("all-MiniLM-L6-v2, Wikipedia description -> article retrieval")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=200, help="tuning pairs (Recall@1 among this many articles)")
    ap.add_argument("--heldout", type=int, default=200, help="held-out pairs for the final check")
    ap.add_argument("--max-length", type=int, default=48, help="tokens per text")
    ap.add_argument("--trials", type=int, default=16)
    ap.add_argument("--max-drop", type=float, default=0.01, help="min Recall@1 = dense Recall@1 - this")
    ap.add_argument("--match-uniform", type=int, default=None, metavar="RANK",
                    help="min Recall@1 = Recall@1 of the uniform rank RANK (overrides --max-drop)")
    ap.add_argument("--ranks", type=int, nargs="+", default=[64, 128, 256], help="uniform-rank baselines")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (the machine is shared)")
    ap.add_argument("--storage", default=None, help="Optuna RDB URL, to resume")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "tune_minilm")
    ap.add_argument("--plot", type=Path, default=ROOT / "docs" / "img" / "tuning_pareto.png")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model, tokenizer = load_minilm()
    model.requires_grad_(False)
    tuning = RetrievalTask(tokenizer, load_wiki_pairs(args.pairs, seed=args.seed), max_length=args.max_length)
    heldout = RetrievalTask(tokenizer, load_wiki_pairs(args.heldout, seed=args.seed, start=args.pairs),
                            max_length=args.max_length)
    cache = FactorCache()
    args.out.mkdir(parents=True, exist_ok=True)
    cached = args.out / "baselines.json"  # dense and uniform results, reused by a resumed run
    key = [args.pairs, args.max_length, args.seed, args.ranks]
    saved = json.loads(cached.read_text()) if cached.exists() else {}
    if saved.get("key") == key:
        dense_recall, baselines = saved["dense_recall"], saved["baselines"]
    else:
        dense_recall = recall(tuning, model)
        baselines = uniform(model, tuning, args.ranks, cache)
        cached.write_text(json.dumps({"key": key, "dense_recall": dense_recall, "baselines": baselines}))
    if args.match_uniform is not None:
        min_quality = next(b["recall"] for b in baselines if b["rank"] == args.match_uniform)
    else:
        min_quality = dense_recall - args.max_drop
    print(f"dense Recall@1 {dense_recall:.4f}; target >= {min_quality:.4f}", flush=True)
    example = dict(tokenizer(["an example sentence to time the encoder"] * 4, padding="max_length",
                             max_length=args.max_length, return_tensors="pt"))
    result = tune(model, lambda m: recall(tuning, m), example_inputs=example, min_quality=min_quality,
                  n_trials=args.trials, storage=args.storage, study_name="minilm-wiki", seed=args.seed)
    dense_params = result.dense.layer_params

    feasible = [b for b in baselines if b["recall"] >= min_quality]
    best_uniform = min(feasible, key=lambda b: b["layer_params"]) if feasible else None
    check = {}
    with torch.no_grad():
        check["dense"] = recall(heldout, model)
        with applied(model, result.policy, cache):
            check["tuned"] = recall(heldout, model)
        if best_uniform is not None:
            with applied(model, Policy.load({"defaults": {"method": "svd", "rank": best_uniform["rank"]}}), cache):
                check["uniform"] = recall(heldout, model)

    result.write(args.out / "policy.toml")
    plot(result, baselines, dense_params, min_quality, args.plot)
    lines = ["| policy | Linear params kept | Recall@1 tuning | Recall@1 held-out |", "|---|---|---|---|",
             f"| dense | {dense_params:,} (100%) | {dense_recall:.4f} | {check['dense']:.4f} |"]
    for b in baselines:
        held = f"{check['uniform']:.4f}" if best_uniform is b else ""
        mark = " (best uniform)" if best_uniform is b else ""
        lines.append(f"| uniform svd rank {b['rank']}{mark} | {b['layer_params']:,} "
                     f"({b['layer_params'] / dense_params:.1%}) | {b['recall']:.4f} | {held} |")
    t = result.best
    lines.append(f"| tuned (trial {t.number}) | {t.layer_params:,} ({t.layer_params / dense_params:.1%}) | "
                 f"{t.quality:.4f} | {check['tuned']:.4f} |")
    summary = "\n".join(lines)
    elapsed = time.perf_counter() - start
    print(summary)
    print(result.table(tablefmt="github"))
    print(f"elapsed {elapsed:.0f} s")
    (args.out / "summary.md").write_text(summary + "\n\n" + result.table(tablefmt="github") + "\n")
    record = {"args": {k: str(v) for k, v in vars(args).items()}, "dense_recall": dense_recall,
              "min_quality": min_quality, "baselines": baselines, "heldout": check, "elapsed_s": elapsed,
              "trials": [{"number": r.number, "source": r.source, "recall": r.quality, "params": r.params,
                          "layer_params": r.layer_params, "latency_ms": r.latency_ms,
                          "memory_bytes": r.memory_bytes, "choices": dict(r.choices)} for r in result.rows]}
    (args.out / "result.json").write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
