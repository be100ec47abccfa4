"""Per-call cost of the panther ops at tiny sizes, where the host time around the kernel is all there is.

At decode-like sizes (a few tokens) an op's time is its host path: argument parsing, the dispatcher, the
autograd wrapper, the kernel launch. This times tiny calls of the linear and attention ops, forward under
``no_grad`` and forward+backward, next to dense ``F.linear`` and SDPA, as the median over rounds of the mean
per call in a tight loop (``--device cuda``: the loop is synchronized once per round, so the figure is the host's
issue rate, the quantity that makes small GPU layers launch-bound).

    python benchmarks/call_overhead.py --device cpu --threads 1

Compare builds by running it with each one on ``PYTHONPATH`` (``panther_fx`` is imported from there).
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F
from tabulate import tabulate

import panther_fx


def cases(device: str) -> dict[str, tuple[Callable[[], torch.Tensor], bool]]:
    """name -> (call, needs grad): a 64 -> 64 layer on one token at rank 8, attention on 16 tokens."""
    p = torch.ops.panther
    g = torch.Generator().manual_seed(0)

    def rnd(*shape: int, grad: bool = False) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(device).requires_grad_(grad)

    x, W, b = rnd(1, 64), rnd(64, 64), rnd(64)
    A, B = rnd(64, 8), rnd(8, 64)
    S1, S2, U1, U2 = rnd(1, 64, 4), rnd(1, 4, 64), rnd(1, 4, 64), rnd(1, 64, 4)
    q, k, v, Wf = rnd(1, 2, 16, 16), rnd(1, 2, 16, 16), rnd(1, 2, 16, 16), rnd(32, 16)
    Wg, bg, Ag, Bg = (t.detach().clone().requires_grad_() for t in (W, b, A, B))
    factors = [t.detach().clone().requires_grad_() for t in (S1, S2, U1, U2)]
    qg = q.detach().clone().requires_grad_()
    return {
        "dense F.linear": (lambda: F.linear(x, W, b), False),
        "panther::lowrank_linear": (lambda: p.lowrank_linear(x, A, B, b), False),
        "panther::sketched_linear": (lambda: p.sketched_linear(x, S1, S2, U1, U2, b), False),
        "F.scaled_dot_product_attention": (lambda: F.scaled_dot_product_attention(q, k, v), False),
        "panther::performer_attention": (lambda: p.performer_attention(q, k, v, Wf), False),
        "dense F.linear, fwd+bwd": (lambda: F.linear(x, Wg, bg), True),
        "panther::lowrank_linear, fwd+bwd": (lambda: p.lowrank_linear(x, Ag, Bg, bg), True),
        "panther::sketched_linear, fwd+bwd": (lambda: p.sketched_linear(x, *factors, bg), True),
        "F.scaled_dot_product_attention, fwd+bwd": (lambda: F.scaled_dot_product_attention(qg, k, v), True),
        "panther::performer_attention, fwd+bwd": (lambda: p.performer_attention(qg, k, v, Wf), True),
    }


def per_call_us(fn: Callable[[], torch.Tensor], backward: bool, device: str, calls: int, rounds: int) -> float:
    step = (lambda: fn().sum().backward()) if backward else fn
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    with torch.enable_grad() if backward else torch.no_grad():
        for _ in range(calls // 10):
            step()
        sync()
        means = []
        for _ in range(rounds):
            start = time.perf_counter()
            for _ in range(calls):
                step()
            sync()
            means.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(means)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    info = panther_fx.kernel_info()
    native = info["ops"]["lowrank_linear"]
    print(f"# torch {torch.__version__}, {info['device']}, {args.threads} thread(s), extension {info['extension']}, "
          f"lowrank_linear native {args.device}: {native[args.device]}, "
          f"native autograd: {native.get('autograd', False)}")
    rows = [(name, f"{per_call_us(fn, backward, args.device, args.calls, args.rounds):.1f}")
            for name, (fn, backward) in cases(args.device).items()]
    print(tabulate(rows, headers=("call", "µs per call"), tablefmt="github"))


if __name__ == "__main__":
    main()
