"""Does ``min_speedup`` keep its promise? One-layer models compiled through the backend, re-timed against Inductor.

    python benchmarks/policy_speed.py --op linear --device cuda --dtype bfloat16 --min-speedup 1.0
    python benchmarks/policy_speed.py --op conv2d --device cuda --dtype bfloat16 --min-speedup 1.5
    python benchmarks/policy_speed.py --op linear --device cpu --tokens 1,256 --sizes 1024 --ranks 32

The speed targets of issues #3 (linear ≥ 1.0× dense wherever the policy rewrites, 1 to 32768 tokens) and #5
(conv ≥ 1.5× dense forward wherever it rewrites at ≥ 4× fewer parameters) are about what the backend *chooses*,
so this benchmark runs the backend itself. For each shape it compiles an ``nn.Linear`` / square "same"
``nn.Conv2d`` with ``backend="panther"`` and the policy ``{method = "svd", rank, min_speedup}``, so the backend
times the layer and keeps it dense when it is too slow. Then it re-times, in a separate measurement, the
compiled model against the same layer compiled by Inductor alone (both under Dynamo, ``fullgraph=True``, so the
per-call guard cost is in both), interleaved, forward under ``torch.no_grad()``, CUDA events on CUDA.

Columns: the backend's ``decision`` ("dense: policy" is a static rule such as break-even, "dense: measured" the
timing) and the ``speedup ×`` it measured at compile time; ``re-timed ×`` = Inductor
dense ms / panther-compiled ms from the second measurement; ``params ×`` = dense / factored weights. A layer
the backend kept dense runs Inductor's dense graph, so its re-timed ratio is 1 up to noise. The promise holds
when every rewritten row re-times at ≥ ``--min-speedup``; the summary line counts the rows that do not.
Linear ranks are absolute (``--ranks 32,128``); conv ranks are fractions of min(C·k², C), as in conv.py.
"""

from __future__ import annotations

import argparse
import copy
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from tabulate import tabulate
from torch import nn

import panther_fx
from panther_fx.passes.speed import median_ms, random_input

from linear import ints, parse_sizes  # a sibling benchmark, importable as `python benchmarks/...` runs it


@dataclass(frozen=True)
class Case:
    """One layer and its input shape; ``rank`` as the policy states it (int or fraction)."""

    label: str
    make: Callable[..., nn.Module]  # make(device=, dtype=)
    input_shape: tuple[int, ...]
    rank: int | float


def floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",")]


def linear_cases(args: argparse.Namespace) -> Iterator[Case]:
    for (i, o), tokens, rank in itertools.product(args.sizes, args.tokens, args.ranks):
        if rank >= min(i, o):
            continue
        yield Case(f"{i}→{o}, {tokens} tok", lambda i=i, o=o, **kw: nn.Linear(i, o, **kw), (tokens, i), rank)


def conv_cases(args: argparse.Namespace) -> Iterator[Case]:
    for k, size, c, rank in itertools.product(args.kernels, args.image_sizes, args.channels, args.fractions):
        if args.batch * c * size * size > args.max_elements:
            continue
        make = lambda c=c, k=k, **kw: nn.Conv2d(c, c, k, padding="same", **kw)  # noqa: E731
        yield Case(f"k{k} C{c} {size}²", make, (args.batch, c, size, size), rank)


def measure(case: Case, args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> tuple:
    """One table row: compile both ways, read the backend's decision, re-time."""
    torch._dynamo.reset()  # fresh caches: no recompile limit across cases, no stale report
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(0)  # a reproducible init whose draws leave the caller's RNG stream untouched
        layer = case.make(device=device, dtype=dtype).requires_grad_(False)
    policy = {"defaults": {"method": "svd", "rank": case.rank, "min_features": 1, "min_speedup": args.min_speedup}}
    panther = torch.compile(copy.deepcopy(layer), backend="panther", fullgraph=True, options={"policy": policy})
    dense = torch.compile(layer, backend="inductor", fullgraph=True)
    x = random_input(case.input_shape, dtype, device)
    with torch.no_grad():
        panther(x)
        report = panther_fx.last_report()[0]
        ms = median_ms({"dense": lambda: dense(x), "panther": lambda: panther(x)}, device,
                       warmup=args.warmup, repeats=args.repeats)
    retimed = ms["dense"] / ms["panther"]
    # a dense layer either failed the timing (it has a measured speedup) or the policy's static rules
    decision = ("rewritten" if report.status == "rewritten"
                else "dense: measured" if report.speedup is not None else "dense: policy")
    params = f"{report.params_before / report.params_after:.1f}" if report.params_after else ""
    measured = "" if report.speedup is None else f"{report.speedup:.2f}"
    short = decision == "rewritten" and retimed < args.min_speedup
    return (case.label, report.rank or case.rank, params, decision, measured, f"{ms['dense']:.4f}", f"{ms['panther']:.4f}",
            f"{retimed:.2f}" + (" (short)" if short else "")), short, decision == "rewritten"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--op", choices=("linear", "conv2d"), required=True)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--min-speedup", type=float, default=1.0)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=25)
    linear = p.add_argument_group("linear")
    linear.add_argument("--tokens", type=ints, default=ints("1,16,64,256,4096,32768"))
    linear.add_argument("--sizes", type=parse_sizes, default=parse_sizes("1024,4096,8192,8192x2048"), help="in[xout],...")
    linear.add_argument("--ranks", type=ints, default=ints("32,128,512"))
    conv = p.add_argument_group("conv2d")
    conv.add_argument("--batch", type=int, default=32)
    conv.add_argument("--kernels", type=ints, default=ints("3,5,9"))
    conv.add_argument("--image-sizes", type=ints, default=ints("32,64,128,256"))
    conv.add_argument("--channels", type=ints, default=ints("64,256,1024"))
    conv.add_argument("--fractions", type=floats, default=floats("0.25,0.125,0.0625"))
    conv.add_argument("--max-elements", type=float, default=2**30,
                      help="skip shapes whose activation (N·C·H·W) exceeds this")
    args = p.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    cases = list(linear_cases(args) if args.op == "linear" else conv_cases(args))
    rows, short, rewritten = [], 0, 0
    for case in cases:
        row, is_short, is_rewritten = measure(case, args, device, dtype)
        rows.append(row)
        short += is_short
        rewritten += is_rewritten
        print(tabulate([row], tablefmt="plain"), flush=True)  # survives a killed run
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"\n{name}, torch {torch.__version__}, {args.dtype}, {args.op}, min_speedup = {args.min_speedup:g}, "
          f"median of {args.repeats} interleaved rounds\n")
    print(tabulate(rows, headers=("layer", "rank", "params ×", "decision", "speedup × (backend)", "inductor dense ms",
                                  "panther ms", "re-timed ×"), tablefmt="github"))
    print(f"\n{rewritten} of {len(rows)} layers rewritten; {short} of them re-time below min_speedup = "
          f"{args.min_speedup:g}")


if __name__ == "__main__":
    main()
