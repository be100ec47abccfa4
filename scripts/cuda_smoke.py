"""Every native CUDA kernel of panther_fx once or twice on small inputs, compared with the CPU result.

Small enough to run under compute-sanitizer (memcheck: out-of-bounds and misaligned accesses; racecheck:
shared-memory races), which is what ``scripts/gpu_validate.sh sanitize`` does; the pytest ``cuda`` tests are
the real parity checks. Exits non-zero on a mismatch or when a kernel did not run natively.

    compute-sanitizer --tool memcheck --error-exitcode 9 python scripts/cuda_smoke.py
"""

from __future__ import annotations

import sys

import torch

import panther_fx  # noqa: F401  (loads the extension)

panther = torch.ops.panther
failures: list[str] = []


def check(name: str, kernel: str, run, tol: float) -> None:
    """run(device) -> tensor or tuple of tensors; CUDA against CPU, relative to the largest CPU entry."""
    before = panther._native_calls(kernel)
    got = run("cuda")
    ran = panther._native_calls(kernel) - before
    want = run("cpu")
    got, want = (got, want) if isinstance(got, tuple) else ((got,), (want,))
    errors = [((g.cpu().double() - w.double()).abs().max() / w.double().abs().max().clamp_min(1e-30)).item()
              for g, w in zip(got, want) if w is not None]
    ok = ran > 0 and max(errors, default=0.0) <= tol
    print(f"{'ok  ' if ok else 'FAIL'} {name}: {kernel} ran {ran}x, max rel error {max(errors, default=0.0):.2e}")
    if not ok:
        failures.append(name)


def randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def main() -> int:
    # fwht: one pass (packed rows, one full tile), then one and two strided passes
    for n, rows in ((16, 5), (8192, 3), (1 << 14, 2), (1 << 21, 1)):
        x = randn(rows, n, seed=n)
        check(f"fwht n={n}", "fwht.cuda", lambda dev, x=x: panther.fwht(x.to(dev)), 1e-5)
    x64 = randn(3, 1 << 13, dtype=torch.float64)
    check("fwht float64 two passes", "fwht.cuda", lambda dev: panther.fwht(x64.to(dev)), 1e-12)

    # sparse sketches: empty output rows, widths below and above one warp's 128 columns
    g = torch.Generator().manual_seed(1)
    for n, c, d, nnz in ((37, 5, 64, 3), (500, 300, 40, 8)):
        rows = torch.stack([torch.randperm(d, generator=g)[:nnz] for _ in range(n)])
        vals, A, G = randn(n, nnz, seed=2), randn(n, c, seed=3), randn(d, c, seed=4)
        check(f"sparse_sketch {n}x{c}", "sparse_sketch.cuda",
              lambda dev: panther.sparse_sketch(A.to(dev), rows.to(dev), vals.to(dev), d), 1e-5)
        check(f"sparse_sketch_t {d}x{c}", "sparse_sketch_t.cuda",
              lambda dev: panther.sparse_sketch_t(G.to(dev), rows.to(dev), vals.to(dev)), 1e-5)

    # linear ops: the fused small-token kernel and the GEMM path
    for tokens in (3, 300):
        x, A, B, bias = randn(tokens, 96, seed=5), randn(64, 16, seed=6) / 4, randn(16, 96, seed=7) / 10, randn(64)
        check(f"lowrank_linear {tokens} tokens", "lowrank_linear.cuda",
              lambda dev: panther.lowrank_linear(x.to(dev), A.to(dev), B.to(dev), bias.to(dev)), 1e-5)
        S1, S2, U1, U2 = (randn(2, 96, 8, seed=8) / 10, randn(2, 8, 64, seed=9) / 3, randn(2, 8, 64, seed=10) / 3,
                          randn(2, 96, 8, seed=11) / 10)
        check(f"sketched_linear {tokens} tokens", "sketched_linear.cuda",
              lambda dev: panther.sketched_linear(x.to(dev), *(t.to(dev) for t in (S1, S2, U1, U2)), bias.to(dev)),
              1e-5)

    # Performer forward and backward: both kernels, causal or not, a float mask; bfloat16 for the split features
    q, k, v = randn(2, 2, 150, 16, seed=12) / 2, randn(2, 2, 150, 16, seed=13) / 2, randn(2, 2, 150, 8, seed=14)
    W, mask = randn(32, 16, seed=15), randn(2, 150, seed=16)
    gout = randn(2, 2, 150, 8, seed=17)
    for kernel in ("softmax", "relu"):
        for causal in (False, True):
            for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 5e-2)):
                tensors = [t.to(dtype) for t in (q, k, v)]

                def forward(dev, tensors=tensors, kernel=kernel, causal=causal):
                    args = [t.to(dev) for t in tensors]
                    return panther.performer_attention(*args, W.to(dev), mask.to(dev), kernel_fn=kernel,
                                                       causal=causal)

                def backward(dev, tensors=tensors, kernel=kernel, causal=causal, dtype=dtype):
                    args = [t.to(dev) for t in tensors]
                    grads = panther.performer_attention_backward(gout.to(dtype).to(dev), *args, W.to(dev),
                                                                 mask.to(dev), kernel, causal, None, [True] * 5)
                    return tuple(grads)

                name = f"performer {kernel} causal={causal} {dtype}"
                check(name, "performer_attention.cuda", forward, tol)
                check(name + " backward", "performer_attention_backward.cuda", backward, tol)

    torch.cuda.synchronize()
    print(f"{len(failures)} failure(s)" + (": " + ", ".join(failures) if failures else ""))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
