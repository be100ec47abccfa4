"""Dense nn.Conv2d vs panther LowRankConv2d / SKConv2d: forward and forward+backward time.

    python benchmarks/conv.py --device cuda --dtype bfloat16                 # the full grid (GPU)
    python benchmarks/conv.py --device cpu --kernels 3 --sizes 32 --channels 64 256 --ranks 0.25 0.125 \
        --batch 8 --iters 5

Square C -> C convolutions with "same" padding; ``--ranks`` are fractions of min(C·kh·kw, C) (svd) and the
sketch rows use num_terms=1 with the same total number of filters (2Lk = rank). Timings are medians over
``--iters`` runs after ``--warmup`` runs, eager mode (each panther layer is one custom op: two ATen
convolutions). "params ×" is dense / factored weight count.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time

import torch
from tabulate import tabulate
from torch import nn

from panther_fx.nn import LowRankConv2d, SKConv2d


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn, device: torch.device, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times)


def measure(module: nn.Module, x: torch.Tensor, warmup: int, iters: int) -> tuple[float, float]:
    """(forward ms under no_grad, forward+backward ms with the input gradient, as inside a network)."""
    xg = x.detach().requires_grad_(True)

    def forward():
        with torch.no_grad():
            module(x)

    def forward_backward():
        module(xg).sum().backward()

    return time_ms(forward, x.device, warmup, iters), time_ms(forward_backward, x.device, warmup, iters)


def params(module: nn.Module) -> int:
    return sum(t.numel() for name, t in itertools.chain(module.named_parameters(), module.named_buffers())
               if name != "bias")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--kernels", type=int, nargs="+", default=[3, 5, 9])
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 128, 256])
    parser.add_argument("--channels", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--ranks", type=float, nargs="+", default=[0.25, 0.125, 0.0625])
    parser.add_argument("--sketch", action="store_true", help="also time SKConv2d (num_terms=1, 2k = rank)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--max-elements", type=float, default=2**31,
                        help="skip configurations whose activation (N·C·H·W) exceeds this")
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    rows = []
    for k, size, c in itertools.product(args.kernels, args.sizes, args.channels):
        if args.batch * c * size * size > args.max_elements:
            continue
        torch.manual_seed(0)
        x = torch.randn(args.batch, c, size, size, device=device, dtype=dtype)
        dense = nn.Conv2d(c, c, k, padding="same", device=device, dtype=dtype)
        dense_fwd, dense_bwd = measure(dense, x, args.warmup, args.iters)
        for fraction in args.ranks:
            rank = max(2, round(fraction * min(c * k * k, c)) // 2 * 2)
            variants = [("svd", LowRankConv2d.from_dense(dense, rank))]
            if args.sketch:
                variants.append(("sketch", SKConv2d.from_dense(dense, 1, rank // 2)))
            for method, module in variants:
                fwd, bwd = measure(module, x, args.warmup, args.iters)
                rows.append((k, size, c, method, rank, f"{params(dense) / params(module):.1f}",
                             f"{dense_fwd:.3f}", f"{fwd:.3f}", f"{dense_fwd / fwd:.2f}",
                             f"{dense_bwd:.3f}", f"{bwd:.3f}", f"{dense_bwd / bwd:.2f}"))
        print(f"done k={k} size={size} C={c}", flush=True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"\n{name}, torch {torch.__version__}, {args.dtype}, batch {args.batch}, median of {args.iters}\n")
    print(tabulate(rows, headers=("k", "H=W", "C", "method", "rank", "params ×", "dense fwd ms", "panther fwd ms",
                                  "fwd speedup", "dense fwd+bwd ms", "panther fwd+bwd ms", "fwd+bwd speedup"),
                   tablefmt="github"))


if __name__ == "__main__":
    main()
