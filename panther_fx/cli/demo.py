"""``panther-fx demo``: the real all-MiniLM-L6-v2, compressed by the panther backend, on Wikipedia retrieval.

Loads the packaged weights offline, compiles the model with ``torch.compile(backend="panther")`` and a
shipped policy, and compares the dense and the compiled model on description -> article retrieval:
the per-layer report, Recall@1 / MRR / mean cosine, Linear parameters and latency per batch."""

from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings

import torch
from tabulate import tabulate
from tqdm import tqdm

from ._common import CLIError, positive_int
from .policies import describe, resolve_policy

DEFAULT_POLICY = "minilm-asvd"
CALIBRATION_START = 5000  # calibration texts: a slice of the shuffled pairs disjoint from [0, n)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("demo", help="compress the real all-MiniLM-L6-v2 and evaluate it on Wikipedia retrieval",
                              description=__doc__)
    p.add_argument("--n", type=positive_int, default=300,
                   help="evaluation pairs (description, article), as in docs/quality.md; 2000 reproduces "
                        "the reference dense Recall@1 0.66, MRR 0.77 (default 300)")
    p.add_argument("--policy", default=DEFAULT_POLICY,
                   help=f"a shipped policy name (see 'panther-fx policies') or a TOML path (default {DEFAULT_POLICY})")
    p.add_argument("--calibration", type=positive_int, default=256,
                   help="calibration pairs for asvd layers, disjoint from the evaluation pairs (default 256)")
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--max-length", type=positive_int, default=128, help="tokens per text (default 128)")
    p.add_argument("--repeats", type=positive_int, default=5, help="timed batches per model for the latency (default 5)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(run=run)


def _latency_ms(models: dict[str, object], batch: dict[str, torch.Tensor], repeats: int) -> dict[str, float]:
    """Median wall time of one forward over ``batch`` per model, after two warm-up calls each; the models run
    interleaved (one call of each per round), so load from other processes hits them alike."""
    for model in models.values():
        for _ in range(2):
            model(**batch)
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(repeats):
        for name, model in models.items():
            t0 = time.perf_counter()
            model(**batch)
            times[name].append(time.perf_counter() - t0)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def _pairs(flag: str, n: int, start: int) -> list[tuple[str, str]]:
    from ..evaluation import load_wiki_pairs

    try:
        return load_wiki_pairs(n, seed=0, start=start)
    except ValueError as e:
        raise CLIError(f"{flag} {n}: {e}") from None


def run(args: argparse.Namespace) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # torch's own deprecation notices (TorchScript inside Inductor) are not the user's to act on.
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\..*")
    from ..backend import last_report
    from ..calibration import calibrate
    from ..evaluation import AssetError, RetrievalTask, load_minilm
    from ..policy import load_policy

    policy_path = resolve_policy(args.policy)
    policy = load_policy(policy_path)
    uses_asvd = any(r.settings.get("method") == "asvd" for r in policy.rules) or policy.defaults.get("method") == "asvd"
    if uses_asvd and args.n > CALIBRATION_START:
        raise CLIError(f"--n {args.n} would overlap the calibration texts (pairs from {CALIBRATION_START} on); "
                       f"use --n <= {CALIBRATION_START} or a policy without asvd")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        model, tokenizer = load_minilm()
        pairs = _pairs("--n", args.n, 0)
        # read before any evaluation runs, so that a bad --calibration fails in a second, not after minutes
        cal_pairs = _pairs("--calibration", args.calibration, CALIBRATION_START) if uses_asvd else []
    except AssetError as e:
        raise CLIError(str(e)) from None
    model.requires_grad_(False)
    task = RetrievalTask(tokenizer, pairs, max_length=args.max_length, batch_size=args.batch_size)
    print(f"panther-fx demo: all-MiniLM-L6-v2, {args.n} Wikipedia description -> article pairs, policy "
          f"{policy_path.stem} ({describe(policy_path)}); torch {torch.__version__}, "
          f"{torch.get_num_threads()} CPU threads", flush=True)

    def bar(desc: str):
        return tqdm(total=task.num_batches(), desc=desc, unit="batch", disable=args.no_progress, leave=False)

    with torch.no_grad():
        with bar("dense") as progress:
            dense = task.evaluate(model, progress=progress)
        options = {"policy": policy}
        if uses_asvd:
            cal_task = RetrievalTask(tokenizer, cal_pairs, max_length=args.max_length, batch_size=args.batch_size)
            texts = [t for pair in cal_pairs for t in pair]
            options["calibration"] = calibrate(model, [enc for _, enc in cal_task.batches(texts)], policy=policy)
        # dynamic=True: symbolic (batch, tokens) from the start, so shapes do not each recompile (Inductor
        # compiles dominate the demo on 2 CPU cores). HF BERT still gets a second graph on the second shape.
        compiled = torch.compile(model, backend="panther", options=options, dynamic=True)
        t0 = time.perf_counter()
        with bar("panther (compiles on the first batch)") as progress:
            result = task.evaluate(compiled, reference=dense.embeddings, progress=progress)
        eval_s = time.perf_counter() - t0
        report = last_report()
        timing_batch = task.batches([d for _, d in pairs])[-1][1]  # the longest documents
        # Inductor on the dense model too: part of the compiled model's gain is Inductor's (fused layer norms,
        # GELU, attention glue), and only the rest is the low-rank layers'.
        inductor = torch.compile(model, dynamic=True)
        ms = _latency_ms({"eager": model, "inductor": inductor, "panther": compiled}, timing_batch, args.repeats)

    print("\nPer-layer report (policy " + str(policy_path) + "):")
    print(report.table())
    before, after = report.params()
    print("\n" + tabulate(
        [("dense (eager)", f"{dense.recall_at_1:.4f}", f"{dense.mrr:.4f}", "1.0000", f"{before:,}", f"{ms['eager']:.1f}"),
         ("dense (Inductor)", "", "", "", f"{before:,}", f"{ms['inductor']:.1f}"),
         ("panther (compiled)", f"{result.recall_at_1:.4f}", f"{result.mrr:.4f}", f"{result.mean_cosine:.4f}",
          f"{after:,}", f"{ms['panther']:.1f}")],
        headers=("model", "Recall@1", "MRR", "mean cosine", "Linear params", "ms / batch")))
    shape = "×".join(map(str, timing_batch["input_ids"].shape))
    print(f"\nLinear parameters: {before:,} -> {after:,} ({1 - after / before:.1%} fewer). Latency: median of "
          f"{args.repeats} interleaved forwards on one {shape} (batch × tokens) batch after warm-up, float32, "
          f"{torch.get_num_threads()} threads: panther is {ms['inductor'] / ms['panther']:.2f}x the dense model "
          f"under the same torch.compile (Inductor), {ms['eager'] / ms['panther']:.2f}x eager; the compiled "
          f"evaluation (with compilation) took {eval_s:.0f} s.")
