"""Every native CUDA kernel of panther_fx once or twice on small inputs, compared with the CPU result.

Small enough to run under compute-sanitizer (memcheck: out-of-bounds and misaligned accesses; racecheck:
shared-memory races), which is what ``scripts/gpu_validate.sh sanitize`` does; the pytest ``cuda`` tests are
the real parity checks. Exits non-zero on a mismatch or when a kernel did not run natively.

    compute-sanitizer --tool memcheck --error-exitcode 9 python scripts/cuda_smoke.py
"""

from __future__ import annotations

import itertools
import sys

import torch

import panther_fx  # noqa: F401  (loads the extension)

panther = torch.ops.panther
failures: list[str] = []


def check(name: str, kernel: str, run, tol: float) -> None:
    """run(device) -> tensor or tuple of tensors; CUDA against CPU, relative to the largest CPU entry. A NaN
    error counts as infinite (Python's max would skip it), and shapes and dtypes must agree."""
    before = panther._native_calls(kernel)
    got = run("cuda")
    ran = panther._native_calls(kernel) - before
    want = run("cpu")
    got, want = (got, want) if isinstance(got, tuple) else ((got,), (want,))
    errors, mismatched = [], []
    for g, w in zip(got, want):
        if w is None:
            continue
        if g is None or g.shape != w.shape or g.dtype != w.dtype:
            mismatched.append(f"{None if g is None else (tuple(g.shape), g.dtype)} vs {(tuple(w.shape), w.dtype)}")
            continue
        e = ((g.cpu().double() - w.double()).abs().max() / w.double().abs().max().clamp_min(1e-30)).item()
        errors.append(e if e == e else float("inf"))
    worst = max(errors, default=0.0)
    ok = ran > 0 and worst <= tol and not mismatched
    print(f"{'ok  ' if ok else 'FAIL'} {name}: {kernel} ran {ran}x, max rel error {worst:.2e}"
          + (f", mismatched outputs {mismatched}" if mismatched else ""))
    if not ok:
        failures.append(name)


def randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def main() -> int:
    # fwht: one pass (packed rows, one full tile), then one strided pass (float rows of 2^14 and 2^21: a row
    # pass of 2^13 and one factor of at most 2^8) and two (2^22 floats, 2^20 doubles)
    for n, rows in ((16, 5), (8192, 3), (1 << 14, 2), (1 << 21, 1), (1 << 22, 1)):
        x = randn(rows, n, seed=n)
        check(f"fwht n={n}", "fwht.cuda", lambda dev, x=x: panther.fwht(x.to(dev)), 1e-5)
    for n in (1 << 13, 1 << 20):
        x64 = randn(1, n, dtype=torch.float64)
        check(f"fwht float64 n={n}", "fwht.cuda", lambda dev, x64=x64: panther.fwht(x64.to(dev)), 1e-12)

    # sparse sketches: empty output rows, widths below and above one warp's 128 columns
    g = torch.Generator().manual_seed(1)
    for n, c, d, nnz in ((37, 5, 64, 3), (500, 300, 40, 8)):
        rows = torch.stack([torch.randperm(d, generator=g)[:nnz] for _ in range(n)])
        vals, A, G = randn(n, nnz, seed=2), randn(n, c, seed=3), randn(d, c, seed=4)
        check(f"sparse_sketch {n}x{c}", "sparse_sketch.cuda",
              lambda dev: panther.sparse_sketch(A.to(dev), rows.to(dev), vals.to(dev), d), 1e-5)
        check(f"sparse_sketch_t {d}x{c}", "sparse_sketch_t.cuda",
              lambda dev: panther.sparse_sketch_t(G.to(dev), rows.to(dev), vals.to(dev)), 1e-5)

    # linear ops: the fused small-token kernel (1, 2, 4 and 8 token tiles; several input chunks and output tiles;
    # lowrank ranks over 16 warps; sketched R = 2Lk below, equal to and not dividing 512) and the GEMM path
    I, O = 300, 600
    # the cases up to 256 tokens all through the fused kernel: its default limit (tokens·in·rank <= 2^17) would
    # send the larger ones to cuBLAS
    torch.ops.panther._cuda_fused_limits(256, 2**40)
    for tokens, R, (L, k) in ((1, 48, (4, 64)), (2, 16, (3, 7)), (3, 8, (2, 8)), (7, 48, (4, 64)), (300, 16, (2, 8))):
        for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 5e-2), (torch.float16, 1e-2)):
            x, bias = randn(tokens, I, seed=5, dtype=dtype), randn(O, seed=6, dtype=dtype)
            A, B = randn(O, R, seed=7, dtype=dtype) * R**-0.5, randn(R, I, seed=8, dtype=dtype) * I**-0.5
            check(f"lowrank_linear {tokens} tokens r={R} {dtype}", "lowrank_linear.cuda",
                  lambda dev, x=x, A=A, B=B, bias=bias: panther.lowrank_linear(x.to(dev), A.to(dev), B.to(dev),
                                                                               bias.to(dev)), tol)
            S1, U2 = (randn(L, I, k, seed=s, dtype=dtype) * I**-0.5 for s in (9, 10))
            S2, U1 = (randn(L, k, O, seed=s, dtype=dtype) * k**-0.5 for s in (11, 12))
            check(f"sketched_linear {tokens} tokens L={L} k={k} {dtype}", "sketched_linear.cuda",
                  lambda dev, x=x, f=(S1, S2, U1, U2), bias=bias: panther.sketched_linear(
                      x.to(dev), *(t.to(dev) for t in f), bias.to(dev)), tol)

    # Performer forward and backward: both kernels, causal or not, a float and a bool mask, every dtype (bfloat16
    # runs the split features)
    q, k, v = randn(2, 2, 150, 16, seed=12) / 2, randn(2, 2, 150, 16, seed=13) / 2, randn(2, 2, 150, 8, seed=14)
    W, gout = randn(32, 16, seed=15), randn(2, 2, 150, 8, seed=17)
    bool_mask = torch.zeros(2, 150, dtype=torch.bool)
    bool_mask[1, 100:] = True
    dtypes = ((torch.float32, 1e-4), (torch.bfloat16, 5e-2), (torch.float16, 5e-2), (torch.float64, 1e-10))
    for kernel, causal, (dtype, tol), mask in itertools.product(("softmax", "relu"), (False, True), dtypes,
                                                                 (randn(2, 150, seed=16), bool_mask)):
        tensors = [t.to(dtype) for t in (q, k, v)]

        def forward(dev, tensors=tensors, kernel=kernel, causal=causal, mask=mask):
            args = [t.to(dev) for t in tensors]
            return panther.performer_attention(*args, W.to(dev), mask.to(dev), kernel_fn=kernel, causal=causal)

        def backward(dev, tensors=tensors, kernel=kernel, causal=causal, dtype=dtype, mask=mask):
            args = [t.to(dev) for t in tensors]
            grads = panther.performer_attention_backward(gout.to(dtype).to(dev), *args, W.to(dev), mask.to(dev),
                                                         kernel, causal, None, [True] * 5)
            return tuple(grads)

        name = f"performer {kernel} causal={causal} {dtype} {'bool' if mask.dtype == torch.bool else 'float'} mask"
        check(name, "performer_attention.cuda", forward, tol)
        check(name + " backward", "performer_attention_backward.cuda", backward, tol)

    torch.cuda.synchronize()
    print(f"{len(failures)} failure(s)" + (": " + ", ".join(failures) if failures else ""))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
