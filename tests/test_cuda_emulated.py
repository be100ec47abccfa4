"""CUDA kernels run on the CPU under cuda_emu (tests/cuda_emu): the CUDA source itself, with its tiles,
shared-memory layout and barriers, against the float64 reference bodies. Each case runs in both scheduling
orders, so a missing barrier changes the result. Covered: the FWHT and sparse-sketch kernels
(csrc/cuda/linalg_cuda.cu) and the fused small-token linear kernel (csrc/cuda/linear_cuda.cu). The GPU tests
(test_linalg_kernels.py, test_kernels.py) check the same kernels on the hardware."""

from __future__ import annotations

import platform
import shutil

import pytest
import torch

from panther_fx.ops import linalg as linalg_ops
from panther_fx.ops import linear as linear_ops

from test_attention_kernels import assert_rel

pytestmark = [
    pytest.mark.cuda_emu,
    pytest.mark.skipif(platform.system() != "Linux" or shutil.which("c++") is None,
                       reason="cuda_emu needs Linux (ucontext) and a C++ compiler"),
]


def build(name, source):
    from cuda_emu import emulator

    return emulator.load(name, [source], emulator.HERE / f"harness_{name.removeprefix('emu_')}.cpp")


@pytest.fixture(scope="module")
def emu_linalg():
    return build("emu_linalg", "linalg_cuda.cu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rows,n", [(3, 1), (5, 2), (7, 64), (3, 1024), (2, 8192), (2, 2 ** 14), (1, 2 ** 17)])
def test_fwht_matches_reference(emu_linalg, dtype, rows, n):
    """Lengths from one element to several 32 KiB tiles: the row kernel alone, then one strided pass."""
    x = torch.randn(rows, n, generator=torch.Generator().manual_seed(n), dtype=dtype)
    for reverse in (False, True):
        emu_linalg.configure(reverse)
        emu_linalg.take_launches()
        expected = linalg_ops.fwht_body(x.double())
        assert_rel(emu_linalg.fwht(x).double(), expected, 4 * torch.finfo(dtype).eps)
        assert len(emu_linalg.take_launches()) == (1 if n * x.element_size() <= 32 * 1024 else 2)


def test_fwht_two_strided_passes(emu_linalg):
    """2^20 float64 values: a 4096-element row pass, then strided passes of 128 and 2 (three launches)."""
    emu_linalg.configure(False)
    emu_linalg.take_launches()
    x = torch.randn(1, 2 ** 20, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    assert_rel(emu_linalg.fwht(x), linalg_ops.fwht_body(x), 4 * torch.finfo(torch.float64).eps)
    assert len(emu_linalg.take_launches()) == 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sparse_sketches_match_reference(emu_linalg, dtype):
    """300 columns of S with 3 nonzeros in 40 rows; 70 and 200 columns of A: ragged 128-column warp steps."""
    g = torch.Generator().manual_seed(3)
    rows = torch.randint(0, 40, (300, 3), generator=g)
    vals = torch.randn(300, 3, generator=g, dtype=dtype)
    A, G = torch.randn(300, 70, generator=g, dtype=dtype), torch.randn(40, 200, generator=g, dtype=dtype)
    tol = 8 * torch.finfo(dtype).eps
    for reverse in (False, True):
        emu_linalg.configure(reverse)
        assert_rel(emu_linalg.sparse_sketch(A, rows, vals, 40).double(),
                   linalg_ops.sparse_sketch_body(A.double(), rows, vals.double(), 40), tol)
        assert_rel(emu_linalg.sparse_sketch_t(G, rows, vals).double(),
                   linalg_ops.sparse_sketch_t_body(G.double(), rows, vals.double()), tol)


@pytest.fixture(scope="module")
def emu_linear():
    module = build("emu_linear", "linear_cuda.cu")
    module.fused_limits(256, 2 ** 40)  # the fused kernel for every case below (the module's own limits)
    return module


def fused_linear_tol(dtype):
    """float32: the kernel's float32 sums; half precisions: the one rounding of y (t stays float32 on chip)."""
    return 16 * torch.finfo(torch.float32).eps if dtype == torch.float32 else torch.finfo(dtype).eps


def run_fused(module, op, args):
    """``op(*args)`` in both scheduling orders; the two results, each from a single fused launch."""
    results = []
    for reverse in (False, True):
        module.configure(reverse)
        module.take_launches()
        results.append(getattr(module, op)(*args))
        assert len(module.take_launches()) == 1, "expected the fused kernel (one launch), got the GEMM form"
    return results


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 2, 3, 5, 19])
@pytest.mark.parametrize("rank", [40, 600])
def test_fused_lowrank_linear_matches_reference(emu_linear, dtype, tokens, rank):
    """Token tiles of 1, 2, 4 and 8 (19: three blocks, the last ragged), 300 inputs (three 128-wide chunks, the
    last ragged), 700 outputs (two 512-column tiles), a rank below and above the 512 threads."""
    g = torch.Generator().manual_seed(tokens * 1000 + rank)
    x = torch.randn(tokens, 300, generator=g).to(dtype)
    A = (torch.randn(700, rank, generator=g) / rank ** 0.5).to(dtype)
    B = (torch.randn(rank, 300, generator=g) / 300 ** 0.5).to(dtype)
    bias = torch.randn(700, generator=g).to(dtype)
    expected = linear_ops.lowrank_linear_body(x.double(), A.double(), B.double(), bias.double())
    for y in run_fused(emu_linear, "lowrank_linear", (x, A, B, bias)):
        assert y.dtype == dtype and y.shape == (tokens, 700)
        assert_rel(y.double(), expected, fused_linear_tol(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 4, 19])
@pytest.mark.parametrize("terms,k", [(2, 20), (1, 300)])
def test_fused_sketched_linear_matches_reference(emu_linear, dtype, tokens, terms, k):
    """2Lk = 80 (input rows split over six thread groups that sum with shared-memory atomics) and 2Lk = 600
    (a thread per column, no atomics); 300 inputs, 700 outputs, no bias."""
    g = torch.Generator().manual_seed(tokens * 1000 + k)
    x = torch.randn(tokens, 300, generator=g).to(dtype)
    S1, U2 = ((torch.randn(terms, 300, k, generator=g) / 300 ** 0.5).to(dtype) for _ in range(2))
    S2, U1 = ((torch.randn(terms, k, 700, generator=g) / k ** 0.5).to(dtype) for _ in range(2))
    expected = linear_ops.sketched_linear_body(x.double(), S1.double(), S2.double(), U1.double(), U2.double())
    for y in run_fused(emu_linear, "sketched_linear", (x, S1, S2, U1, U2, None)):
        assert y.dtype == dtype and y.shape == (tokens, 700)
        assert_rel(y.double(), expected, fused_linear_tol(dtype))
