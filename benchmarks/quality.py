"""Quality study: Recall@1 vs Linear-parameter reduction on the real all-MiniLM-L6-v2, without fine-tuning.

For svd, asvd and sketch at several ranks, with and without encoder layer 0 kept dense, every encoder
nn.Linear is factorized through the one shared code path (:func:`panther_fx.passes.linear.plan_linear`) and
its weight replaced by the factored product Ŵ (what ``panther.lowrank_linear`` / ``sketched_linear``
compute, up to float rounding), then the model is evaluated on Wikipedia description -> article retrieval.
asvd is calibrated on Wikipedia texts disjoint from the evaluation pairs.

    python benchmarks/quality.py --n 2000                  # writes docs/quality.md, docs/img/quality.png
    python benchmarks/quality.py --n 300 --ranks 96 160 --methods svd asvd --no-write   # quick look
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch
from tabulate import tabulate
from tqdm import tqdm

from panther_fx.calibration import calibrate
from panther_fx.evaluation import RetrievalTask, load_minilm, load_wiki_pairs
from panther_fx.passes import FactorCache
from panther_fx.passes.linear import dense_from_factors, plan_linear
from panther_fx.policy import Policy
from panther_fx.report import Report

ROOT = Path(__file__).resolve().parents[1]
CALIBRATION_START = 5000  # calibration pairs come from [5000, 5000 + n_cal) of the shuffled order: disjoint
TOLERANCE = 0.05          # headline: largest reduction within this much Recall@1 of dense


def policy_for(method: str, rank: int, first_dense: bool, *, damping: float | None = None) -> Policy:
    """All encoder Linears with ``method`` at ``rank`` (sketch: num_terms=1, low_rank=rank/2, the same
    parameter count as rank); the pooler stays dense (mean pooling does not use it)."""
    settings = {"method": method, "rank": rank} if method != "sketch" else {"method": "sketch", "num_terms": 1,
                                                                              "low_rank": rank // 2}
    if method == "asvd" and damping is not None:
        settings["damping"] = damping
    rules = [{"match": "encoder.layer.0.**", "method": "dense"}] if first_dense else []
    rules.append({"match": "encoder.**", **settings})
    return Policy.load({"defaults": {"method": "dense", "min_features": 0}, "rule": rules})


def compress(model: torch.nn.Module, policy: Policy, grams: dict[str, torch.Tensor] | None) -> tuple[torch.nn.Module, Report]:
    """A copy of ``model`` whose selected Linear weights are replaced by their factored products."""
    model = copy.deepcopy(model)
    report = Report()
    cache = FactorCache()
    for path, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or not path.startswith("encoder."):
            continue
        plan = plan_linear(path, module.weight, policy, cache, calibration=grams)
        report.append(plan.report)
        if plan.factors is not None:
            with torch.no_grad():
                module.weight.copy_(dense_from_factors(plan.factors).to(module.weight.dtype))
    return model, report


def calibration_grams(model, tokenizer, n_cal: int, max_length: int) -> dict[str, torch.Tensor]:
    pairs = load_wiki_pairs(n_cal, seed=0, start=CALIBRATION_START)
    task = RetrievalTask(tokenizer, pairs, max_length=max_length)
    texts = [t for pair in pairs for t in pair]
    return calibrate(model, [enc for _, enc in task.batches(texts)])


def run(args: argparse.Namespace) -> list[dict]:
    torch.set_num_threads(args.threads) if args.threads else None
    model, tokenizer = load_minilm()
    task = RetrievalTask(tokenizer, load_wiki_pairs(args.n, seed=0), max_length=args.max_length)
    dense = task.evaluate(model)
    rows = [{"method": "dense", "rank": None, "first_dense": None, "reduction": 0.0, "recall_at_1": dense.recall_at_1,
             "mrr": dense.mrr, "mean_cosine": 1.0, "n": args.n, "n_cal": args.n_cal}]
    print(f"dense: R@1 {dense.recall_at_1:.4f} MRR {dense.mrr:.4f} (n={args.n})", flush=True)
    grams = None
    if any(method == "asvd" for method, _, _ in args.configs) or (not args.configs and "asvd" in args.methods):
        t0 = time.perf_counter()
        grams = calibration_grams(model, tokenizer, args.n_cal, args.max_length)
        print(f"calibration: {args.n_cal} pairs ({2 * args.n_cal} texts), {time.perf_counter() - t0:.0f} s", flush=True)
    configs = args.configs or [(m, r, fd) for m in args.methods for r in args.ranks for fd in args.first_dense]
    for method, rank, first_dense in tqdm(configs, desc="configs"):
        compressed, report = compress(model, policy_for(method, rank, first_dense, damping=args.damping), grams)
        before, after = report.params()
        res = task.evaluate(compressed, reference=dense.embeddings)
        row = {"method": method, "rank": rank, "first_dense": first_dense, "reduction": 1 - after / before,
               "recall_at_1": res.recall_at_1, "mrr": res.mrr, "mean_cosine": res.mean_cosine}
        rows.append(row)
        tqdm.write(json.dumps(row))
        if args.json:  # after every configuration, so an interrupted run keeps what it measured
            args.json.write_text(json.dumps(rows, indent=1))
    return rows


def headline(rows: list[dict], method: str) -> dict | None:
    dense = rows[0]["recall_at_1"]
    ok = [r for r in rows if r["method"] == method and r["recall_at_1"] >= dense - TOLERANCE]
    return max(ok, key=lambda r: r["reduction"]) if ok else None


def table(rows: list[dict], tablefmt: str = "github") -> str:
    body = [(r["method"], "" if r["rank"] is None else r["rank"],
             "" if r["first_dense"] is None else ("dense" if r["first_dense"] else "compressed"),
             f"{r['reduction']:.1%}", f"{r['recall_at_1']:.4f}", f"{r['mrr']:.4f}", f"{r['mean_cosine']:.4f}")
            for r in rows]
    return tabulate(body, headers=("method", "rank", "layer 0", "Linear params removed", "Recall@1", "MRR",
                                   "mean cosine vs dense"), tablefmt=tablefmt)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    dense = rows[0]["recall_at_1"]
    ax.axhline(dense, color="k", lw=1, label="dense")
    ax.axhline(dense - TOLERANCE, color="k", lw=1, ls=":", label=f"dense − {TOLERANCE}")
    for method, color in (("svd", "C0"), ("asvd", "C1"), ("sketch", "C2")):
        for first_dense, style in ((False, "-o"), (True, "--s")):
            pts = sorted((r["reduction"], r["recall_at_1"]) for r in rows
                         if r["method"] == method and r["first_dense"] == first_dense)
            if pts:
                ax.plot(*zip(*pts), style, color=color,
                        label=f"{method}{' (layer 0 dense)' if first_dense else ''}")
    ax.set_xlabel("encoder Linear parameters removed")
    ax.set_ylabel("Recall@1")
    ax.set_title(f"all-MiniLM-L6-v2, Wikipedia description → article (n={rows[0].get('n', '')}), no fine-tuning",
                 fontsize=9)
    ax.xaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def _config(text: str) -> tuple[str, int, bool]:
    method, rank, first_dense = text.split(":")
    if method not in ("svd", "asvd", "sketch"):
        raise argparse.ArgumentTypeError(f"unknown method {method!r}")
    return method, int(rank), bool(int(first_dense))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=2000, help="evaluation pairs")
    p.add_argument("--n-cal", type=int, default=256, help="calibration pairs (2 texts each), disjoint from evaluation")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--methods", nargs="+", default=["svd", "asvd", "sketch"], choices=["svd", "asvd", "sketch"])
    p.add_argument("--ranks", nargs="+", type=int, default=[64, 96, 128, 160, 176])
    p.add_argument("--first-dense", nargs="+", type=int, default=[0, 1], choices=[0, 1],
                   help="1: keep encoder layer 0 dense")
    p.add_argument("--configs", nargs="+", type=_config, default=[],
                   help="explicit METHOD:RANK:LAYER0DENSE triples (e.g. asvd:160:1) instead of the grid")
    p.add_argument("--damping", type=float, default=None, help="asvd damping relative to mean diag(XᵀX)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="also write the raw rows here")
    p.add_argument("--render-only", action="store_true",
                   help="evaluate nothing: write the table and plot from the --merge files")
    p.add_argument("--no-write", action="store_true", help="print only; do not write docs/quality.md and the plot")
    p.add_argument("--merge", type=Path, nargs="*", default=[],
                   help="JSON rows of earlier runs with the same --n/--n-cal/--max-length to include")
    args = p.parse_args()
    args.first_dense = [bool(v) for v in args.first_dense]
    if args.render_only:
        if not args.merge:
            p.error("--render-only needs --merge FILES")
        rows = json.loads(args.merge[0].read_text())[:1]
    else:
        rows = run(args)
    for path in args.merge:
        known = {(r["method"], r["rank"], r["first_dense"]) for r in rows}
        rows += [r for r in json.loads(path.read_text())[1:] if (r["method"], r["rank"], r["first_dense"]) not in known]
    order = {"svd": 0, "asvd": 1, "sketch": 2}
    rows[1:] = sorted(rows[1:], key=lambda r: (order[r["method"]], r["first_dense"], r["rank"]))
    n = rows[0].setdefault("n", args.n)
    print(table(rows))
    lines = []
    for method in ("svd", "asvd"):
        best = headline(rows, method)
        lines.append(f"- **{method}**: " + ("no configuration stays within "
                                             f"{TOLERANCE} Recall@1 of dense" if best is None else
                                             f"{best['reduction']:.1%} of the encoder Linear parameters removed at "
                                             f"Recall@1 {best['recall_at_1']:.4f} (dense {rows[0]['recall_at_1']:.4f};"
                                             f" rank {best['rank']}, layer 0 "
                                             f"{'dense' if best['first_dense'] else 'compressed'})"))
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    if not args.no_write:
        plot(rows, ROOT / "docs" / "img" / "quality.png")
        generated = (f"Written by `python benchmarks/quality.py {' '.join(sys.argv[1:])}`.\n\n" + table(rows)
                     + f"\n\nLargest reduction within {TOLERANCE} Recall@1 of dense (n = {n}):\n\n"
                     + "\n".join(lines))
        write_section(ROOT / "docs" / "quality.md", generated)


BEGIN, END = "<!-- quality.py: begin -->", "<!-- quality.py: end -->"


def write_section(path: Path, text: str) -> None:
    """Replace the generated part of ``path`` (between the markers), keeping the hand-written analysis."""
    doc = path.read_text() if path.exists() else f"# Quality study\n\n{BEGIN}\n{END}\n"
    head, _, rest = doc.partition(BEGIN)
    _, _, tail = rest.partition(END)
    path.write_text(f"{head}{BEGIN}\n{text}\n{END}{tail}")


if __name__ == "__main__":
    main()
