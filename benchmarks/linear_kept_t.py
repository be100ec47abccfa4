"""Forward+backward of ``panther::lowrank_linear`` with the kept rank-r intermediate against the kernel sequence
that recomputes it, side by side in one run.

When A needs a gradient, the op's autograd kernel runs ``lowrank_linear_with_t`` and takes gA = gyᵀ t from the
kept t = x Bᵀ; before, the backward recomputed t, one more GEMM that reads x (6 GEMMs per step instead of 5).
"recompute" here calls the forward op and the backward op with every gradient requested, under no_grad, which is
exactly what the previous autograd kernel ran. Medians over interleaved rounds after a warm-up round.

    python benchmarks/linear_kept_t.py --device cpu --threads 2
    python benchmarks/linear_kept_t.py --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse

import torch
from linear import Timer  # the sibling benchmark's interleaved CUDA-event / perf_counter timer
from tabulate import tabulate

import panther_fx  # noqa: F401  (registers torch.ops.panther)

P = torch.ops.panther
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CASES = {"cpu": [(8192, 2048, 2048, 128), (16384, 4096, 4096, 64)],
         "cuda": [(32768, 8192, 8192, 128), (32768, 4096, 4096, 128), (8192, 8192, 8192, 512)]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--reps", type=int, default=9, help="interleaved rounds after one warm-up call of each")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype, device = DTYPES[args.dtype], torch.device(args.device)
    g = torch.Generator(device=device).manual_seed(0)
    timer = Timer(device, reps=args.reps, warmup=1, min_time=0.0)  # interleaved, so load hits both alike
    rows = []
    for N, I, O, r in CASES[args.device]:
        def rnd(*shape):
            return torch.randn(*shape, generator=g, device=device, dtype=dtype).requires_grad_()

        x, A, B, b, gy = rnd(N, I), rnd(O, r), rnd(r, I), rnd(O), rnd(N, O).detach()

        def kept_t():
            for t in (x, A, B, b):
                t.grad = None  # so that backward() stores gradients instead of adding into old ones
            P.lowrank_linear(x, A, B, b).backward(gy)

        def recompute_t():
            with torch.no_grad():
                P.lowrank_linear(x, A, B, b)
                P.lowrank_linear_backward(gy, x, A, B, [True, True, True, True])

        kept, recomputed = timer.many([kept_t, recompute_t])
        rows.append([f"{N}x{I}->{O} r={r}", f"{kept * 1e3:.2f}", f"{recomputed * 1e3:.2f}", f"{recomputed / kept:.2f}"])
    print(f"device {torch.cuda.get_device_name(0) if args.device == 'cuda' else 'cpu'}, {args.dtype}, "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(tabulate(rows, headers=["case", "kept t ms", "recompute t ms", "speedup"], tablefmt="github"))


if __name__ == "__main__":
    main()
