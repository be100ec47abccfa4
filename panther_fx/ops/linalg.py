"""Structured-sketch kernels as ``torch.ops.panther`` custom ops.

* ``panther::fwht(Tensor x) -> Tensor``: orthonormal fast Walsh–Hadamard transform along the last dim.
* ``panther::sparse_sketch(Tensor A, Tensor rows, Tensor vals, SymInt sketch_size) -> Tensor``: S @ A for a
  sparse S given column-wise (column j of S has nonzeros ``vals[j]`` in rows ``rows[j]``).
* ``panther::sparse_sketch_t(Tensor G, Tensor rows, Tensor vals) -> Tensor``: Sᵀ @ G, its adjoint.

The Python bodies are the fallback on every device and the reference for native kernels registered under
the same names with ``TORCH_LIBRARY_IMPL(panther, CPU | CUDA, m)``. Each op's autograd (a Python formula,
:mod:`panther_fx.ops._library`) is expressed with the other ops, so a native kernel speeds up the backward as
well.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._library import define_op, register_autograd

__all__ = ["fwht", "fwht_body", "sparse_sketch", "sparse_sketch_body", "sparse_sketch_t", "sparse_sketch_t_body",
           "is_power_of_two"]


def is_power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def _check_fwht(x: Tensor) -> None:
    torch._check(x.dim() >= 1, lambda: "fwht: x must have at least one dimension")
    n = x.shape[-1]
    torch._check(is_power_of_two(n), lambda: f"fwht: the last dim must be a power of two, got {n} (zero-pad it)")
    torch._check(x.is_floating_point(), lambda: f"fwht: x must be a floating-point tensor, got {x.dtype}")


def fwht_body(x: Tensor) -> Tensor:
    """Orthonormal Walsh–Hadamard transform along the last dim: y = x Hₙ / √n, n = 2^p.

    Hₙ is the Sylvester Hadamard matrix (H₁ = [1], H₂ₙ = [[Hₙ, Hₙ], [Hₙ, −Hₙ]]), symmetric, so the transform
    is its own inverse and its own transpose. Computed as p butterfly stages on reshaped views (each stage
    reads and writes the tensor once), in x's dtype, then scaled by 1/√n.
    """
    _check_fwht(x)
    n = x.shape[-1]
    lead = x.shape[:-1]
    src = x.reshape(-1, n).clone(memory_format=torch.contiguous_format)  # the views below need row-major
    dst = torch.empty_like(src)
    rows = src.shape[0]
    h = 1
    while h < n:
        a = src.view(rows, n // (2 * h), 2, h)
        out = dst.view(rows, n // (2 * h), 2, h)
        torch.add(a[:, :, 0], a[:, :, 1], out=out[:, :, 0])
        torch.sub(a[:, :, 0], a[:, :, 1], out=out[:, :, 1])
        src, dst = dst, src
        h *= 2
    return src.mul_(n ** -0.5).reshape(*lead, n)


def _fwht_fake(x):
    _check_fwht(x)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


fwht = define_op("fwht(Tensor x) -> Tensor", fwht_body, _fwht_fake)


def _fwht_backward(ctx, gy):
    # The orthonormal transform is symmetric: its adjoint is itself.
    return fwht(gy)


register_autograd("fwht", _fwht_backward, None)  # the backward needs nothing saved


def _check_sparse(A: Tensor, rows: Tensor, vals: Tensor, name: str) -> None:
    torch._check(A.dim() == 2, lambda: f"{name}: the dense operand must be 2-D, got shape {tuple(A.shape)}")
    torch._check(rows.dim() == 2 and rows.shape == vals.shape,
                 lambda: f"{name}: rows {tuple(rows.shape)} and vals {tuple(vals.shape)} must both be (n, nnz)")
    torch._check(rows.dtype == torch.int64, lambda: f"{name}: rows must be int64, got {rows.dtype}")
    torch._check(vals.dtype == A.dtype, lambda: f"{name}: vals dtype {vals.dtype} differs from {A.dtype}")


def _check_rows_in_range(rows: Tensor, sketch_size: int, name: str) -> None:
    """Out-of-range rows would index out of bounds inside the sparse product: check them (one sync)."""
    bad = bool(((rows < 0) | (rows >= sketch_size)).any())
    torch._check(not bad, lambda: f"{name}: rows must lie in [0, {sketch_size}), got [{int(rows.min())}, {int(rows.max())}]")


def sparse_sketch_body(A: Tensor, rows: Tensor, vals: Tensor, sketch_size: int) -> Tensor:
    """S @ A for A (n, c) and a sparse S (sketch_size, n) with S[rows[j, t], j] = vals[j, t].

    rows, vals: (n, nnz). out[rows[j, t]] += vals[j, t] · A[j], computed as a COO sparse-dense product
    (``index_add_`` along dim 0 is an order of magnitude slower on the CPU).
    """
    _check_sparse(A, rows, vals, "sparse_sketch")
    torch._check(A.shape[0] == rows.shape[0], lambda: f"sparse_sketch: A has {A.shape[0]} rows, S has {rows.shape[0]} columns")
    _check_rows_in_range(rows, sketch_size, "sparse_sketch")
    n, nnz = rows.shape
    cols = torch.arange(n, device=rows.device).repeat_interleave(nnz)
    S = torch.sparse_coo_tensor(torch.stack((rows.reshape(-1), cols)), vals.reshape(-1), (sketch_size, n),
                                check_invariants=False)
    return torch.sparse.mm(S, A.contiguous())  # a strided A makes the CPU sparse product ~100x slower


def _sparse_sketch_fake(A, rows, vals, sketch_size):
    _check_sparse(A, rows, vals, "sparse_sketch")
    torch._check(A.shape[0] == rows.shape[0], lambda: f"sparse_sketch: A has {A.shape[0]} rows, S has {rows.shape[0]} columns")
    return A.new_empty((sketch_size, A.shape[1]))


sparse_sketch = define_op("sparse_sketch(Tensor A, Tensor rows, Tensor vals, SymInt sketch_size) -> Tensor",
                          sparse_sketch_body, _sparse_sketch_fake)


def sparse_sketch_t_body(G: Tensor, rows: Tensor, vals: Tensor) -> Tensor:
    """Sᵀ @ G for G (d, c) and S as in :func:`sparse_sketch_body` -> (n, c): out[j] = Σ_t vals[j, t] · G[rows[j, t]]."""
    _check_sparse(G, rows, vals, "sparse_sketch_t")
    _check_rows_in_range(rows, G.shape[0], "sparse_sketch_t")
    n, nnz = rows.shape
    cols = torch.arange(n, device=rows.device).repeat_interleave(nnz)
    St = torch.sparse_coo_tensor(torch.stack((cols, rows.reshape(-1))), vals.reshape(-1), (n, G.shape[0]),
                                 check_invariants=False)
    return torch.sparse.mm(St, G.contiguous())


def _sparse_sketch_t_fake(G, rows, vals):
    _check_sparse(G, rows, vals, "sparse_sketch_t")
    return G.new_empty((rows.shape[0], G.shape[1]))


sparse_sketch_t = define_op("sparse_sketch_t(Tensor G, Tensor rows, Tensor vals) -> Tensor", sparse_sketch_t_body,
                            _sparse_sketch_t_fake)


def _vals_grad(dense_n: Tensor, dense_d: Tensor, rows: Tensor) -> Tensor:
    """∂/∂vals[j, t] of <G, S A> = <A[j], G[rows[j, t]]> for dense_n = A (n, c), dense_d = G (d, c)."""
    return (dense_d[rows] * dense_n[:, None, :]).sum(-1)


def _sketch_setup(ctx, inputs, output):
    A, rows, vals, _ = inputs
    ctx.save_for_backward(A, rows, vals)


def _sketch_backward(ctx, gy):
    A, rows, vals = ctx.saved_tensors
    need_A, _, need_vals, _ = ctx.needs_input_grad
    gA = sparse_sketch_t(gy, rows, vals) if need_A else None
    gvals = _vals_grad(A, gy, rows) if need_vals else None
    return gA, None, gvals, None


def _sketch_t_setup(ctx, inputs, output):
    G, rows, vals = inputs
    ctx.save_for_backward(G, rows, vals)
    ctx.sketch_size = G.shape[0]


def _sketch_t_backward(ctx, gy):
    G, rows, vals = ctx.saved_tensors
    need_G, _, need_vals = ctx.needs_input_grad
    gG = sparse_sketch(gy, rows, vals, ctx.sketch_size) if need_G else None
    gvals = _vals_grad(gy, G, rows) if need_vals else None
    return gG, None, gvals


register_autograd("sparse_sketch", _sketch_backward, _sketch_setup)
register_autograd("sparse_sketch_t", _sketch_t_backward, _sketch_t_setup)
