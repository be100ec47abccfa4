"""Dense nn.Conv2d vs panther LowRankConv2d / SKConv2d: forward and forward+backward time.

    python benchmarks/conv.py --device cuda --dtype bfloat16                 # the full grid (GPU)
    python benchmarks/conv.py --device cpu --kernels 3 --sizes 32 --channels 64 256 --ranks 0.25 0.125 \
        --batch 8 --iters 5

Square C -> C convolutions with "same" padding; ``--ranks`` are fractions of min(C·kh·kw, C) (svd) and the
sketch rows use num_terms=1 with the same total number of filters (2Lk = rank). The factored layers are built
with their constructors (seeded random factors: speed does not depend on the values, and an exact SVD of a
1024 × 82944 kernel per rank would cost more than the timings). Timings are medians over ``--iters`` rounds
after ``--warmup``, the dense layer and its factored variants interleaved, CUDA events on CUDA
(:func:`panther_fx.passes.speed.median_ms`), eager mode (each panther layer is one custom op: two ATen
convolutions). "params ×" is dense / factored weight count.
"""

from __future__ import annotations

import argparse
import itertools
from typing import Callable

import torch
from tabulate import tabulate
from torch import nn

from panther_fx.nn import LowRankConv2d, SKConv2d
from panther_fx.passes.speed import median_ms


def forward_fn(module: nn.Module, x: torch.Tensor) -> Callable[[], object]:
    """The forward under no_grad."""
    def run() -> None:
        with torch.no_grad():
            module(x)
    return run


def forward_backward_fn(module: nn.Module, x: torch.Tensor) -> Callable[[], object]:
    """Forward and backward with the input gradient, as inside a network."""
    xg = x.detach().requires_grad_(True)
    return lambda: module(xg).sum().backward()


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
        geometry = dict(padding="same", device=device, dtype=dtype)
        modules = {("dense", 0): nn.Conv2d(c, c, k, **geometry)}
        for fraction in args.ranks:
            rank = max(2, round(fraction * min(c * k * k, c)) // 2 * 2)
            modules["svd", rank] = LowRankConv2d(c, c, k, **geometry, rank=rank, seed=0)
            if args.sketch:
                modules["sketch", rank] = SKConv2d(c, c, k, **geometry, num_terms=1, low_rank=rank // 2, seed=0)
        fwd = median_ms({key: forward_fn(m, x) for key, m in modules.items()}, device, warmup=args.warmup,
                        repeats=args.iters)
        bwd = median_ms({key: forward_backward_fn(m, x) for key, m in modules.items()}, device,
                        warmup=args.warmup, repeats=args.iters)
        dense = modules["dense", 0]
        for (method, rank), module in modules.items():
            if method == "dense":
                continue
            key, base = (method, rank), ("dense", 0)
            rows.append((k, size, c, method, rank, f"{params(dense) / params(module):.1f}",
                         f"{fwd[base]:.3f}", f"{fwd[key]:.3f}", f"{fwd[base] / fwd[key]:.2f}",
                         f"{bwd[base]:.3f}", f"{bwd[key]:.3f}", f"{bwd[base] / bwd[key]:.2f}"))
        print(tabulate(rows[-len(modules) + 1:], tablefmt="plain"), flush=True)  # survives a killed run
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"\n{name}, torch {torch.__version__}, {args.dtype}, batch {args.batch}, median of {args.iters} "
          "interleaved rounds\n")
    print(tabulate(rows, headers=("k", "H=W", "C", "method", "rank", "params ×", "dense fwd ms", "panther fwd ms",
                                  "fwd speedup", "dense fwd+bwd ms", "panther fwd+bwd ms", "fwd+bwd speedup"),
                   tablefmt="github"))


if __name__ == "__main__":
    main()
