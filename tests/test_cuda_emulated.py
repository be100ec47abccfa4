"""CUDA kernels run on the CPU under cuda_emu (tests/cuda_emu): the CUDA source itself, with its tiles,
shared-memory layout and barriers, against the float64 reference bodies. Each case runs in both scheduling
orders, so a missing barrier changes the result. Covered: the FWHT and sparse-sketch kernels
(csrc/cuda/linalg_cuda.cu). The GPU tests (test_linalg_kernels.py) check the same kernels on the hardware."""

from __future__ import annotations

import platform
import shutil

import pytest
import torch

from panther_fx.ops import linalg as linalg_ops

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
