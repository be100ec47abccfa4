"""Low-rank and sketched linear layers as ``torch.ops.panther`` custom ops.

Each op has a pure-PyTorch body (``*_body``: the fallback on every device and the reference for the native
kernels that ``panther_fx._C`` registers under the same name), a fake kernel for tracing and an autograd formula
(in C++ when the extension is loaded, see :mod:`panther_fx.ops._library`). Inputs may have any number of leading
dimensions; all tensors share one dtype.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ._autocast import autocast_to_lower_precision
from ._library import check_no_double_backward, define_op, register_autograd

__all__ = ["lowrank_linear", "lowrank_linear_with_t", "lowrank_linear_backward", "sketched_linear",
           "sketched_linear_backward", "lowrank_linear_body", "lowrank_linear_with_t_body",
           "lowrank_linear_backward_body", "sketched_linear_body", "sketched_linear_backward_body", "sketch_concat"]


def _check_lowrank(x: Tensor, A: Tensor, B: Tensor, bias: Optional[Tensor]) -> None:
    torch._check(A.dim() == 2 and B.dim() == 2, lambda: f"lowrank_linear: A and B must be 2-D, got {A.dim()}-D and {B.dim()}-D")
    torch._check(x.dim() >= 1, lambda: "lowrank_linear: x must have at least one dimension")
    torch._check(x.shape[-1] == B.shape[1], lambda: f"lowrank_linear: x has {x.shape[-1]} features but B is {tuple(B.shape)} (r, in)")
    torch._check(A.shape[1] == B.shape[0], lambda: f"lowrank_linear: A {tuple(A.shape)} (out, r) and B {tuple(B.shape)} (r, in) disagree on r")
    torch._check(x.dtype == A.dtype == B.dtype, lambda: f"lowrank_linear: dtypes differ: x {x.dtype}, A {A.dtype}, B {B.dtype}")
    if bias is not None:
        torch._check(bias.shape == (A.shape[0],), lambda: f"lowrank_linear: bias must have shape ({A.shape[0]},), got {tuple(bias.shape)}")
        torch._check(bias.dtype == x.dtype, lambda: f"lowrank_linear: bias dtype {bias.dtype} differs from x dtype {x.dtype}")


def lowrank_linear_body(x: Tensor, A: Tensor, B: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """y = (x Bᵀ) Aᵀ + bias for x (..., I), A (O, r), B (r, I), bias (O,) -> y (..., O)."""
    _check_lowrank(x, A, B, bias)
    x2 = x.reshape(-1, x.shape[-1])
    t = torch.mm(x2, B.t())
    y = torch.addmm(bias, t, A.t()) if bias is not None else torch.mm(t, A.t())
    return y.reshape(*x.shape[:-1], A.shape[0])


def _lowrank_fake(x, A, B, bias=None):
    _check_lowrank(x, A, B, bias)
    return x.new_empty((*x.shape[:-1], A.shape[0]))


lowrank_linear = define_op("lowrank_linear(Tensor x, Tensor A, Tensor B, Tensor? bias=None) -> Tensor",
                           lowrank_linear_body, _lowrank_fake)


def lowrank_linear_with_t_body(x: Tensor, A: Tensor, B: Tensor, bias: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """(y, t): :func:`lowrank_linear_body`'s y and its rank-r intermediate t = x Bᵀ (..., r).

    The C++ autograd kernel calls this op when A needs a gradient and keeps t for gA = gyᵀ t, so that the
    backward does not read x again to recompute t. It has no derivative of its own.
    """
    _check_lowrank(x, A, B, bias)
    t = torch.matmul(x, B.t())
    y = torch.addmm(bias, t.reshape(-1, t.shape[-1]), A.t()) if bias is not None else torch.matmul(t, A.t())
    return y.reshape(*x.shape[:-1], A.shape[0]), t


def _lowrank_with_t_fake(x, A, B, bias=None):
    _check_lowrank(x, A, B, bias)
    return x.new_empty((*x.shape[:-1], A.shape[0])), x.new_empty((*x.shape[:-1], B.shape[0]))


lowrank_linear_with_t = define_op(
    "lowrank_linear_with_t(Tensor x, Tensor A, Tensor B, Tensor? bias=None) -> (Tensor, Tensor)",
    lowrank_linear_with_t_body, _lowrank_with_t_fake)


def _bias_given(inputs: tuple, position: int) -> bool:
    # The default-None bias may be left out of ``inputs`` when the op is traced (e.g. by aot_autograd).
    return len(inputs) > position and inputs[position] is not None


def _lowrank_setup(ctx, inputs, output):
    x, A, B = inputs[:3]
    ctx.save_for_backward(x, A, B)
    ctx.has_bias = _bias_given(inputs, 3)


def lowrank_linear_backward_body(gy, x, A, B, needs):
    """Gradients of :func:`lowrank_linear` w.r.t. (x, A, B, bias); entry i is None unless ``needs[i]``.

    With t = x Bᵀ (N, r) and gt = gy A (N, r): gx = gt B, gA = gyᵀ t, gB = gtᵀ x, gbias = Σ_rows gy.
    """
    need_x, need_A, need_B, need_bias = needs
    gy2 = gy.reshape(-1, gy.shape[-1])
    x2 = x.reshape(-1, x.shape[-1])
    gt = torch.mm(gy2, A)  # (N, r): gradient of the rank-r intermediate t = x Bᵀ
    gx = torch.mm(gt, B).reshape(x.shape) if need_x else None
    gA = torch.mm(gy2.t(), torch.mm(x2, B.t())) if need_A else None
    gB = torch.mm(gt.t(), x2) if need_B else None
    gbias = gy2.sum(0) if need_bias else None
    return gx, gA, gB, gbias


def _lowrank_backward_fake(gy, x, A, B, needs):
    shapes = (x.shape, A.shape, B.shape, (A.shape[0],))
    return tuple(x.new_empty(shape) if need else None for need, shape in zip(needs, shapes))


lowrank_linear_backward = define_op(
    "lowrank_linear_backward(Tensor gy, Tensor x, Tensor A, Tensor B, bool[4] needs) "
    "-> (Tensor?, Tensor?, Tensor?, Tensor?)", lowrank_linear_backward_body, _lowrank_backward_fake)


def _lowrank_backward(ctx, gy):
    check_no_double_backward("lowrank_linear")
    x, A, B = ctx.saved_tensors
    n_inputs = len(ctx.needs_input_grad)  # 3 when bias was omitted from the call
    needs = [*ctx.needs_input_grad, False][:4]
    needs[3] = ctx.has_bias and needs[3]
    return torch.ops.panther.lowrank_linear_backward(gy, x, A, B, needs)[:n_inputs]


register_autograd("lowrank_linear", _lowrank_backward, _lowrank_setup)
autocast_to_lower_precision("panther::lowrank_linear")


def _check_sketched(x, S1, S2, U1, U2, bias) -> None:
    torch._check(all(t.dim() == 3 for t in (S1, S2, U1, U2)), lambda: "sketched_linear: S1, S2, U1, U2 must be 3-D (L, ., .)")
    L, I, k = S1.shape
    O = S2.shape[2]
    torch._check(L >= 1, lambda: f"sketched_linear: S1 {tuple(S1.shape)} has no terms (L = 0); the output is scaled by 1/(2L)")
    torch._check(x.dim() >= 1, lambda: "sketched_linear: x must have at least one dimension")
    torch._check(x.shape[-1] == I, lambda: f"sketched_linear: x has {x.shape[-1]} features but S1 is {tuple(S1.shape)} (L, in, k)")
    for name, t, shape in (("S2", S2, (L, k, O)), ("U1", U1, (L, k, O)), ("U2", U2, (L, I, k))):
        torch._check(t.shape == shape, lambda name=name, t=t, shape=shape: f"sketched_linear: {name} must have shape {shape}, got {tuple(t.shape)}")
        torch._check(t.dtype == x.dtype, lambda name=name, t=t: f"sketched_linear: {name} dtype {t.dtype} differs from x dtype {x.dtype}")
    torch._check(S1.dtype == x.dtype, lambda: f"sketched_linear: S1 dtype {S1.dtype} differs from x dtype {x.dtype}")
    if bias is not None:
        torch._check(bias.shape == (O,), lambda: f"sketched_linear: bias must have shape ({O},), got {tuple(bias.shape)}")
        torch._check(bias.dtype == x.dtype, lambda: f"sketched_linear: bias dtype {bias.dtype} differs from x dtype {x.dtype}")


def sketch_concat(S1: Tensor, S2: Tensor, U1: Tensor, U2: Tensor) -> tuple[Tensor, Tensor]:
    """Concatenate the 2L rank-k terms into one rank-2Lk product ``left @ right``.

    left (I, 2Lk) holds [S1_i | U2_i] and right (2Lk, O) holds [U1_i ; S2_i] for i = 1..L, so that
    ``x @ left @ right = Σ_i (x S1_i U1_i + x U2_i S2_i)``.
    """
    L, I, k = S1.shape
    left = torch.cat([S1, U2], dim=2).transpose(0, 1).reshape(I, 2 * L * k)
    right = torch.cat([U1, S2], dim=1).reshape(2 * L * k, S2.shape[2])
    return left, right


def sketched_linear_body(x: Tensor, S1: Tensor, S2: Tensor, U1: Tensor, U2: Tensor,
                         bias: Optional[Tensor] = None) -> Tensor:
    """Panther's SKLinear: y = 1/(2L) Σ_i (x S1_i U1_i + x U2_i S2_i) + bias.

    Shapes: x (..., I), S1 (L, I, k), S2 (L, k, O), U1 (L, k, O), U2 (L, I, k), bias (O,) -> y (..., O).
    Computed as two GEMMs over the concatenated factors (:func:`sketch_concat`), scaling in the epilogue.
    """
    _check_sketched(x, S1, S2, U1, U2, bias)
    L, O = S1.shape[0], S2.shape[2]
    left, right = sketch_concat(S1, S2, U1, U2)
    t = torch.mm(x.reshape(-1, x.shape[-1]), left)
    base = bias if bias is not None else t.new_zeros(())
    y = torch.addmm(base, t, right, alpha=1.0 / (2 * L))
    return y.reshape(*x.shape[:-1], O)


def _sketched_fake(x, S1, S2, U1, U2, bias=None):
    _check_sketched(x, S1, S2, U1, U2, bias)
    return x.new_empty((*x.shape[:-1], S2.shape[2]))


sketched_linear = define_op(
    "sketched_linear(Tensor x, Tensor S1, Tensor S2, Tensor U1, Tensor U2, Tensor? bias=None) -> Tensor",
    sketched_linear_body, _sketched_fake)


def _sketched_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:5])
    ctx.has_bias = _bias_given(inputs, 5)


def sketched_linear_backward_body(gy, x, S1, S2, U1, U2, needs):
    """Gradients of :func:`sketched_linear` w.r.t. (x, S1, S2, U1, U2, bias); entry i is None unless ``needs[i]``.

    With left, right from :func:`sketch_concat`, s = 1/(2L), t = x left and gt = s gy rightᵀ (N, 2Lk):
    gx = gt leftᵀ, g(left) = xᵀ gt, g(right) = s tᵀ gy, gbias = Σ_rows gy.
    """
    need_x, need_S1, need_S2, need_U1, need_U2, need_bias = needs
    L, I, k = S1.shape
    O = S2.shape[2]
    scale = 1.0 / (2 * L)
    left, right = sketch_concat(S1, S2, U1, U2)
    gy2 = gy.reshape(-1, O)
    x2 = x.reshape(-1, I)
    gt = torch.mm(gy2, right.t()).mul_(scale)  # (N, 2Lk): gradient of t = x @ left
    gx = torch.mm(gt, left.t()).reshape(x.shape) if need_x else None
    gS1 = gU2 = gS2 = gU1 = None
    if need_S1 or need_U2:
        gleft = torch.mm(x2.t(), gt).reshape(I, L, 2 * k).transpose(0, 1)  # (L, I, 2k)
        gS1 = gleft[:, :, :k].contiguous() if need_S1 else None
        gU2 = gleft[:, :, k:].contiguous() if need_U2 else None
    if need_S2 or need_U1:
        gright = torch.mm(torch.mm(x2, left).t(), gy2).mul_(scale).reshape(L, 2 * k, O)
        gU1 = gright[:, :k].contiguous() if need_U1 else None
        gS2 = gright[:, k:].contiguous() if need_S2 else None
    gbias = gy2.sum(0) if need_bias else None
    return gx, gS1, gS2, gU1, gU2, gbias


def _sketched_backward_fake(gy, x, S1, S2, U1, U2, needs):
    shapes = (x.shape, S1.shape, S2.shape, U1.shape, U2.shape, (S2.shape[2],))
    return tuple(x.new_empty(shape) if need else None for need, shape in zip(needs, shapes))


sketched_linear_backward = define_op(
    "sketched_linear_backward(Tensor gy, Tensor x, Tensor S1, Tensor S2, Tensor U1, Tensor U2, bool[6] needs) "
    "-> (Tensor?, Tensor?, Tensor?, Tensor?, Tensor?, Tensor?)", sketched_linear_backward_body,
    _sketched_backward_fake)


def _sketched_backward(ctx, gy):
    check_no_double_backward("sketched_linear")
    x, S1, S2, U1, U2 = ctx.saved_tensors
    n_inputs = len(ctx.needs_input_grad)  # 5 when bias was omitted from the call
    needs = [*ctx.needs_input_grad, False][:6]
    needs[5] = ctx.has_bias and needs[5]
    return torch.ops.panther.sketched_linear_backward(gy, x, S1, S2, U1, U2, needs)[:n_inputs]


register_autograd("sketched_linear", _sketched_backward, _sketched_setup)
autocast_to_lower_precision("panther::sketched_linear")
