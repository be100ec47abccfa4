"""Compress the real all-MiniLM-L6-v2 with panther_fx.convert (svd) and recover it by distillation.

    python benchmarks/distill_minilm.py                      # the documented run (docs/distillation.md)
    python benchmarks/distill_minilm.py --n-eval 200 --train-texts 64 --seq-len 32   # smoke run

1. Dense model: Recall@1 / MRR of description -> article retrieval on ``--n-eval`` Wikipedia pairs
   (panther_fx.evaluation.retrieval, pairs [0, n_eval) of the seed-0 order).
2. ``convert`` with ``method = --method`` (svd, or asvd calibrated on the distillation texts),
   ``rank = --rank`` on every Linear (the 36 encoder Linears and the
   pooler): the Linear parameter reduction is printed from the convert report.
3. Distil the compressed model from the dense one on Wikipedia article text DISJOINT from the evaluation
   pairs (pairs [n_eval, n_eval + train_texts) of the same order: their leads, cut to ``--seq-len`` tokens),
   MSE on the last hidden states over real tokens; embeddings frozen, the rest (factors, LayerNorms,
   biases) trained with AdamW.
4. Evaluate again and print the table (also written as JSON with ``--json``).

Everything runs on the CPU in float32, offline.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
from tabulate import tabulate

import panther_fx
from panther_fx.evaluation import RetrievalTask, load_minilm, load_wiki_pairs


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n-eval", type=int, default=1000, help="evaluation pairs (default 1000)")
    p.add_argument("--rank", type=int, default=127, help="SVD rank of every Linear (127: >= 50%% fewer Linear parameters)")
    p.add_argument("--policy", default=None,
                   help="a policy file (e.g. per-layer ranks written by `panther-fx tune`) instead of the "
                        "uniform --method/--rank; asvd rules are calibrated on the distillation texts")
    p.add_argument("--method", choices=("svd", "asvd"), default="svd",
                   help="asvd is calibrated on the distillation texts (disjoint from the evaluation pairs)")
    p.add_argument("--train-texts", type=int, default=1024, help="article leads used for distillation")
    p.add_argument("--seq-len", type=int, default=64, help="tokens per distillation text")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--loss", choices=("mse", "cosine", "similarity"), default="mse",
                   help="similarity: cosine + in-batch similarity KL; each batch then holds batch-size/2 "
                        "descriptions and their leads")
    p.add_argument("--temperature", type=float, default=0.05, help="of the similarity loss")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--json", default=None, help="write the results to this JSON file")
    return p.parse_args()


def distillation_batches(tokenizer, texts: list[str], seq_len: int, batch_size: int) -> list[dict[str, torch.Tensor]]:
    """Tokenized batches of article text, each text truncated to ``seq_len`` tokens."""
    batches = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(texts[i:i + batch_size], padding=True, truncation=True, max_length=seq_len,
                        pad_to_multiple_of=16, return_tensors="pt")
        batches.append(dict(enc))
    return batches


def evaluate(name: str, model, task: RetrievalTask, reference=None):
    start = time.perf_counter()
    result = task.evaluate(model, reference=reference)
    print(f"[{name}] Recall@1 {result.recall_at_1:.4f}  MRR {result.mrr:.4f}  ({time.perf_counter() - start:.0f} s)",
          flush=True)
    return result


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    teacher, tokenizer = load_minilm()
    task = RetrievalTask(tokenizer, load_wiki_pairs(args.n_eval, seed=0))
    train_pairs = load_wiki_pairs(args.train_texts, seed=0, start=args.n_eval)  # disjoint from evaluation
    dense = evaluate("dense", teacher, task)

    # Leads (cut to seq_len) and their short descriptions: the two kinds of text the task embeds.
    if args.loss == "similarity":  # descriptions next to their leads, so the in-batch similarities include them
        half = args.batch_size // 2
        texts = [t for i in range(0, len(train_pairs), half) for t in
                 [d for d, _ in train_pairs[i:i + half]] + [lead for _, lead in train_pairs[i:i + half]]]
        batches = distillation_batches(tokenizer, texts, args.seq_len, args.batch_size)
    else:
        leads = distillation_batches(tokenizer, [lead for _, lead in train_pairs], args.seq_len, args.batch_size)
        descriptions = distillation_batches(tokenizer, [d for d, _ in train_pairs], args.seq_len, args.batch_size)
        batches = [b for pair in zip(leads, descriptions) for b in pair]

    policy = panther_fx.policy.load_policy(args.policy or {"defaults": {"method": args.method, "rank": args.rank}})
    uses_asvd = any(r.settings.get("method") == "asvd" for r in policy.rules) or policy.defaults.get("method") == "asvd"
    grams = panther_fx.calibrate(teacher, batches, policy=policy) if uses_asvd else None
    student, report = panther_fx.convert(teacher, policy, calibration=grams, inplace=False)
    before, after = report.params()
    print(report.table(), flush=True)
    compressed = evaluate("compressed", student, task, reference=dense.embeddings)

    student.embeddings.requires_grad_(False)  # the embedding table is not compressed: keep it as is
    start = time.perf_counter()
    history = panther_fx.distill(student, teacher, batches, epochs=args.epochs, lr=args.lr, loss=args.loss,
                                 temperature=args.temperature)
    train_s = time.perf_counter() - start
    print(f"distillation: {len(batches)} batches x {args.epochs} epochs in {train_s:.0f} s, loss per epoch {history}",
          flush=True)
    distilled = evaluate("compressed+distilled", student, task, reference=dense.embeddings)

    compression = args.policy or f"{args.method} rank {args.rank}"
    rows = [(name, f"{r.recall_at_1:.4f}", f"{r.mrr:.4f}", "" if r.mean_cosine is None else f"{r.mean_cosine:.4f}",
             f"{r.recall_at_1 - dense.recall_at_1:+.4f}")
            for name, r in (("dense", dense), (f"compressed ({compression})", compressed),
                            ("compressed + distilled", distilled))]
    print(f"\nall-MiniLM-L6-v2, {args.n_eval} Wikipedia description -> article pairs; Linear weights "
          f"{before:,} -> {after:,} ({1 - after / before:.1%} fewer), {compression}")
    print(tabulate(rows, headers=("model", "Recall@1", "MRR", "cos to dense", "ΔRecall@1"), tablefmt="github"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "linear_params": [before, after], "train_seconds": train_s,
                       "loss_per_epoch": history,
                       "results": {name: {"recall_at_1": r.recall_at_1, "mrr": r.mrr, "mean_cosine": r.mean_cosine}
                                   for name, r in (("dense", dense), ("compressed", compressed),
                                                   ("distilled", distilled))}}, f, indent=2)


if __name__ == "__main__":
    main()
