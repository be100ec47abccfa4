"""Native CPU kernels of panther::fwht, panther::sparse_sketch and panther::sparse_sketch_t
(csrc/cpu/linalg_cpu.cpp) against explicit float64 matrices and the pure-PyTorch reference bodies
(panther_fx/ops/linalg.py). Skipped when the extension is not built or disabled."""

from __future__ import annotations

import glob
import math
import os

import pytest
import torch

import panther_fx
from panther_fx.ops import linalg as ops

panther = torch.ops.panther
F64 = torch.float64
BUILT = bool(glob.glob(os.path.join(os.path.dirname(panther_fx.__file__), "_C*.so")))
pytestmark = pytest.mark.skipif(not BUILT or os.environ.get("PANTHER_NO_EXT") == "1",
                                reason="panther_fx._C is not built (PANTHER_BUILD_EXT=0) or disabled")
# Entries of the results below are O(1); float32 sums of up to log₂ n = 16 butterfly stages or 8 products.
TOL = {torch.float32: dict(rtol=0, atol=2e-5), F64: dict(rtol=0, atol=1e-13)}


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request):
    """Run with 1 and 2 intra-op threads: the kernels split rows / output columns across threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def calls(kernel: str) -> int:
    return panther._native_calls(kernel)


def hadamard(n: int) -> torch.Tensor:
    """Sylvester Hadamard matrix H_n in float64 (H_2n = [[H_n, H_n], [H_n, -H_n]])."""
    H = torch.ones(1, 1, dtype=F64)
    while H.shape[0] < n:
        H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)], 0)
    return H


def test_kernels_registered_and_reported():
    info = panther_fx.kernel_info()
    for op in ("fwht", "sparse_sketch", "sparse_sketch_t"):
        assert info["ops"][op]["cpu"], f"{op} has no native CPU kernel"


# ---------------------------------------------------------------- fwht
@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("p", range(0, 13))
def test_fwht_matches_explicit_hadamard(p, dtype, threads):
    n = 1 << p
    x64 = torch.randn(2, 33, n, dtype=F64, generator=torch.Generator().manual_seed(p))
    expected = x64 @ hadamard(n) / math.sqrt(n)
    before = calls("fwht.cpu")
    y = panther.fwht(x64.to(dtype))
    assert calls("fwht.cpu") == before + 1
    assert y.dtype == dtype and y.shape == x64.shape and y.is_contiguous()
    torch.testing.assert_close(y.double(), expected, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("p", [13, 14, 15, 16])
def test_fwht_large_rows_match_reference(p, dtype, threads):
    """Rows longer than the in-cache block run the large-stride stages on column tiles; the reference
    (float64 reference body) is exact up to rounding, and the transform is an involution."""
    n = 1 << p
    x64 = torch.randn(3, n, dtype=F64, generator=torch.Generator().manual_seed(p))
    y = panther.fwht(x64.to(dtype))
    torch.testing.assert_close(y.double(), ops.fwht_body(x64), **TOL[dtype])
    torch.testing.assert_close(panther.fwht(y).double(), x64.to(dtype).double(), **TOL[dtype])


def test_fwht_noncontiguous_and_batched(threads):
    base = torch.randn(64, 5, 3, dtype=F64)
    x = base.permute(2, 1, 0)  # (3, 5, 64), last-dim stride 15
    assert not x.is_contiguous()
    torch.testing.assert_close(panther.fwht(x), x @ hadamard(64) / 8.0, **TOL[F64])
    empty = torch.empty(0, 16)
    assert panther.fwht(empty).shape == (0, 16)


def test_fwht_bfloat16_computed_in_float():
    # Seeded: the float32 butterflies round once to bfloat16, which a float64 reference matches except at rare
    # double-rounding ties; a fixed input keeps the exact comparison deterministic.
    x = torch.randn(4, 256, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(0))
    y = panther.fwht(x)
    assert y.dtype == torch.bfloat16
    expected = (x.double() @ hadamard(256) / 16.0).to(torch.bfloat16)  # one rounding, like the kernel
    torch.testing.assert_close(y, expected, rtol=0, atol=0)


def test_fwht_errors():
    with pytest.raises(RuntimeError, match="power of two"):
        panther.fwht(torch.randn(3, 12))
    with pytest.raises(RuntimeError, match="floating-point"):
        panther.fwht(torch.ones(3, 4, dtype=torch.int64))


@pytest.mark.parametrize("shape", [(1,), (8,), (3, 16), (2, 3, 4096)])
def test_fwht_opcheck_and_gradcheck_dispatch_native(shape):
    x = torch.randn(shape, dtype=F64, requires_grad=True)
    torch.library.opcheck(ops.fwht, (x,))
    before = calls("fwht.cpu")
    ops.fwht(x).sum().backward()  # forward and backward (fwht again) both run natively
    assert calls("fwht.cpu") == before + 2
    if x.numel() <= 64:
        assert torch.autograd.gradcheck(ops.fwht, (x,))


# ---------------------------------------------------------------- sparse sketch
def sparse_inputs(n, c, d, nnz, dtype, seed=0):
    """A (n, c), rows/vals (n, nnz) with distinct rows per column, and the dense S (d, n) in float64."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.stack([torch.randperm(d, generator=g)[:nnz] for _ in range(n)])
    vals = torch.randn(n, nnz, dtype=F64, generator=g)
    S = torch.zeros(d, n, dtype=F64)
    S[rows, torch.arange(n)[:, None].expand(n, nnz)] = vals
    A = torch.randn(n, c, dtype=F64, generator=g)
    return A.to(dtype), rows, vals.to(dtype), S


# (n, c, d, nnz): single entries, widths below / above the per-thread column grain and the 8-column panel.
SHAPES = [(1, 1, 1, 1), (37, 5, 6, 3), (300, 17, 9, 4), (500, 100, 64, 8), (64, 333, 40, 8)]


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("layout", ["row-major", "column-major", "strided"])
@pytest.mark.parametrize("shape", SHAPES)
def test_sparse_sketch_matches_dense(shape, layout, dtype, threads):
    n, c, d, nnz = shape
    A, rows, vals, S = sparse_inputs(n, c, d, nnz, dtype)
    if layout == "column-major":  # A = Bᵀ, as when a sketch is applied along the last dim
        A = A.t().contiguous().t()
    elif layout == "strided":
        A = torch.repeat_interleave(A, 2, dim=0)[::2]
    before = calls("sparse_sketch.cpu")
    out = panther.sparse_sketch(A, rows, vals, d)
    assert calls("sparse_sketch.cpu") == before + 1
    assert out.dtype == dtype and out.shape == (d, c) and out.is_contiguous()
    torch.testing.assert_close(out.double(), S @ A.double() if dtype == F64 else S.to(dtype).double() @ A.double(),
                               **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("shape", SHAPES)
def test_sparse_sketch_t_matches_dense(shape, dtype, threads):
    n, c, d, nnz = shape
    _, rows, vals, S = sparse_inputs(n, c, d, nnz, dtype)
    G = torch.randn(d, c, dtype=F64).to(dtype)
    before = calls("sparse_sketch_t.cpu")
    out = panther.sparse_sketch_t(G, rows, vals)
    assert calls("sparse_sketch_t.cpu") == before + 1
    assert out.dtype == dtype and out.shape == (n, c)
    torch.testing.assert_close(out.double(), S.to(dtype).double().t() @ G.double(), **TOL[dtype])


def test_sparse_sketch_matches_reference_on_a_sketch_operator():
    from panther_fx.linalg import SparseSignSketch

    S = SparseSignSketch(250, 20000, generator=0, dtype=F64)
    A = torch.randn(20000, 48, dtype=F64)
    torch.testing.assert_close(panther.sparse_sketch(A, S.rows, S.vals, 250),
                               ops.sparse_sketch_body(A, S.rows, S.vals, 250), **TOL[F64])
    G = torch.randn(250, 48, dtype=F64)
    torch.testing.assert_close(panther.sparse_sketch_t(G, S.rows, S.vals),
                               ops.sparse_sketch_t_body(G, S.rows, S.vals), **TOL[F64])


def test_sparse_sketch_bfloat16_computed_in_float():
    A, rows, vals, S = sparse_inputs(50, 16, 10, 3, torch.bfloat16)
    expected = (S.to(torch.bfloat16).double() @ A.double()).to(torch.bfloat16)
    torch.testing.assert_close(panther.sparse_sketch(A, rows, vals, 10), expected, rtol=1e-2, atol=1e-2)


def test_sparse_sketch_errors():
    A, rows, vals, _ = sparse_inputs(12, 5, 6, 3, F64)
    with pytest.raises(RuntimeError, match=r"rows must lie in \[0, 6\)"):
        panther.sparse_sketch(A, rows + 1, vals, 6)
    with pytest.raises(RuntimeError, match=r"rows must lie in \[0, 6\)"):
        panther.sparse_sketch_t(torch.randn(6, 2, dtype=F64), rows - 1, vals)
    with pytest.raises(RuntimeError, match="vals dtype"):
        panther.sparse_sketch(A, rows, vals.float(), 6)
    with pytest.raises(RuntimeError, match="rows must be int64"):
        panther.sparse_sketch(A, rows.int(), vals, 6)
    with pytest.raises(RuntimeError, match="A has 11 rows"):
        panther.sparse_sketch(A[:11], rows, vals, 6)


def test_sparse_sketch_opcheck_and_backward_dispatch_native():
    A, rows, vals, S = sparse_inputs(40, 9, 8, 3, F64)
    A.requires_grad_(True)
    vals.requires_grad_(True)
    G = torch.randn(8, 9, dtype=F64, requires_grad=True)
    torch.library.opcheck(ops.sparse_sketch, (A, rows, vals, 8))
    torch.library.opcheck(ops.sparse_sketch_t, (G, rows, vals))
    before = (calls("sparse_sketch.cpu"), calls("sparse_sketch_t.cpu"))
    ops.sparse_sketch(A, rows, vals, 8).square().sum().backward()  # backward of S @ A runs Sᵀ @ gy
    assert (calls("sparse_sketch.cpu"), calls("sparse_sketch_t.cpu")) == (before[0] + 1, before[1] + 1)
    torch.testing.assert_close(A.grad, S.t() @ (2 * S @ A.detach()), **TOL[F64])
    assert torch.autograd.gradcheck(lambda a, v: ops.sparse_sketch(a, rows, v, 8), (A, vals))
    assert torch.autograd.gradcheck(lambda g, v: ops.sparse_sketch_t(g, rows, v), (G, vals))


# ---------------------------------------------------------------- CUDA (skipped without a GPU)
needs_cuda_kernels = pytest.mark.skipif(not panther_fx.kernel_info()["ops"]["fwht"]["cuda"],
                                        reason="CUDA kernels not built (needs a CUDA toolkit at install time, or PANTHER_CUDA=1)")


@pytest.mark.cuda
@needs_cuda_kernels
@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("p", [0, 1, 2, 3, 4, 5, 7, 10, 12, 13, 14, 16, 18, 21, 22])
def test_fwht_cuda_matches_reference(p, dtype):
    """Up to the 32 KiB tile (2^13 floats, 2^12 doubles) one pass; beyond it one strided pass per factor of
    256 (128 for doubles): 2^22 takes three passes. Small n packs several rows per block."""
    n = 1 << p
    rows = max(1, min(37, (1 << 23) // n))
    x64 = torch.randn(rows, n, dtype=F64, generator=torch.Generator().manual_seed(p))
    expected = x64 @ hadamard(n) / math.sqrt(n) if p <= 12 else ops.fwht_body(x64)
    before = calls("fwht.cuda")
    y = panther.fwht(x64.to(dtype).cuda())
    assert calls("fwht.cuda") == before + 1
    assert y.device.type == "cuda" and y.dtype == dtype and y.shape == x64.shape
    torch.testing.assert_close(y.cpu().double(), expected, **TOL[dtype])
    torch.testing.assert_close(panther.fwht(y).cpu().double(), x64.to(dtype).double(), **TOL[dtype])


@pytest.mark.cuda
@needs_cuda_kernels
def test_fwht_cuda_strided_bfloat16_empty_and_autograd():
    base = torch.randn(64, 5, 3, dtype=F64, device="cuda")
    x = base.permute(2, 1, 0)
    torch.testing.assert_close(panther.fwht(x).cpu(), x.cpu() @ hadamard(64) / 8.0, **TOL[F64])
    xb = torch.randn(4, 256, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(0))  # as on the CPU
    expected = (xb.double() @ hadamard(256) / 16.0).to(torch.bfloat16)
    torch.testing.assert_close(panther.fwht(xb.cuda()).cpu(), expected, rtol=0, atol=0)
    assert panther.fwht(torch.empty(0, 16, device="cuda")).shape == (0, 16)
    xg = torch.randn(2, 3, 4096, dtype=F64, device="cuda", requires_grad=True)
    torch.library.opcheck(ops.fwht, (xg,))


@pytest.mark.cuda
@needs_cuda_kernels
@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("shape", SHAPES + [(20000, 48, 250, 8), (3000, 1000, 64, 1)])
def test_sparse_sketches_cuda_match_dense(shape, dtype):
    n, c, d, nnz = shape
    A, rows, vals, S = sparse_inputs(n, c, d, nnz, dtype)
    G = torch.randn(d, c, dtype=F64).to(dtype)
    before = calls("sparse_sketch.cuda"), calls("sparse_sketch_t.cuda")
    out = panther.sparse_sketch(A.cuda(), rows.cuda(), vals.cuda(), d)
    out_t = panther.sparse_sketch_t(G.cuda(), rows.cuda(), vals.cuda())
    assert (calls("sparse_sketch.cuda"), calls("sparse_sketch_t.cuda")) == (before[0] + 1, before[1] + 1)
    S = S.to(dtype).double()
    # An output entry sums up to ~640 products (up to ~100 in size at 20000 rows): bound each entry's error by
    # the dtype's rounding of its absolute terms, which any missing or extra term would exceed.
    bound = (1e-6 if dtype == torch.float32 else 2e-15) * (S.abs() @ A.double().abs())
    assert ((out.cpu().double() - S @ A.double()).abs() <= bound).all()
    torch.testing.assert_close(out_t.cpu().double(), S.t() @ G.double(), **TOL[dtype])
    # Sums run in a fixed order (sorted entries, no atomics): repeated calls agree bit for bit.
    assert torch.equal(panther.sparse_sketch(A.cuda(), rows.cuda(), vals.cuda(), d), out)


@pytest.mark.cuda
@needs_cuda_kernels
def test_sparse_sketch_cuda_errors_and_opcheck():
    A, rows, vals, _ = (t.cuda() if isinstance(t, torch.Tensor) else t for t in sparse_inputs(12, 5, 6, 3, F64))
    with pytest.raises(RuntimeError, match=r"rows must lie in \[0, 6\)"):
        panther.sparse_sketch(A, rows + 1, vals, 6)
    with pytest.raises(RuntimeError, match="must be on"):
        panther.sparse_sketch(A, rows.cpu(), vals, 6)
    A.requires_grad_(True)
    vals.requires_grad_(True)
    torch.library.opcheck(ops.sparse_sketch, (A, rows, vals, 6))
    torch.library.opcheck(ops.sparse_sketch_t, (torch.randn(6, 5, dtype=F64, device="cuda"), rows, vals))
