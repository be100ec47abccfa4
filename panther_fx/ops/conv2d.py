"""Low-rank and sketched Conv2d as ``torch.ops.panther`` custom ops.

Both are "a conv with m filters, then a grouped 1×1 conv to O channels, + bias" (ATen convolutions, so cuDNN
on CUDA), differing only in the 1×1 weight:

- ``lowrank_conv2d(x, V (r, C/G, kh, kw), U (O, r/G) or (O, r/G, 1, 1), bias, stride, padding, dilation,
  groups)``: the 1×1 weight is U.
- ``sketched_conv2d(x, S1 (G·2Lk, C/G, kh, kw), U1 (2L, k, O), bias, stride, padding, dilation, groups)``
  (Panther SKConv2d): y = 1/(2L) Σ_i U1_iᵀ ⋆ conv(x, S1_i) + b; the 1×1 weight is U1 rearranged to
  (O, 2Lk) / (2L) (:func:`sketch_mix_weight`).

With G groups, the first conv has G groups (filters [g·m/G, (g+1)·m/G) see input group g) and so does the
1×1 conv, so the factored layer keeps the grouped block structure. x is (N, C, H, W).

``padding`` is canonical (:func:`conv_padding`): [ph, pw] (symmetric), or [left, right, top, bottom] in
``F.pad`` order for "same" with an even effective kernel, where PyTorch pads one more on the right/bottom.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ._autocast import autocast_to_lower_precision
from ._library import define_op, register_autograd

__all__ = ["conv_padding", "lowrank_conv2d", "lowrank_conv2d_body", "sketch_mix_weight", "sketched_conv2d",
           "sketched_conv2d_body"]

_GEOMETRY = "SymInt[] stride, SymInt[] padding, SymInt[] dilation, SymInt groups"


def _pair(v: int | Sequence[int]) -> list[int]:
    return [int(v), int(v)] if isinstance(v, int) else [int(e) for e in v]


def conv_padding(padding: int | Sequence[int] | str, kernel_size: int | Sequence[int],
                 stride: int | Sequence[int] = 1, dilation: int | Sequence[int] = 1) -> list[int]:
    """Canonical padding for the ops: an int, a pair, "valid" or "same" (as ``F.conv2d`` defines them).

    "same" pads d·(k-1) in total per dimension, the extra pixel of an odd total on the right/bottom, and is
    only defined for stride 1. Returns [ph, pw] or, when "same" is asymmetric, [left, right, top, bottom].
    """
    if isinstance(padding, str):
        if padding == "valid":
            return [0, 0]
        if padding != "same":
            raise ValueError(f"padding must be an int, a pair, 'valid' or 'same', got {padding!r}")
        if _pair(stride) != [1, 1]:
            raise ValueError(f"padding='same' is not supported for strided convolutions (stride={stride})")
        (kh, kw), (dh, dw) = _pair(kernel_size), _pair(dilation)
        th, tw = dh * (kh - 1), dw * (kw - 1)
        if th % 2 == 0 and tw % 2 == 0:
            return [th // 2, tw // 2]
        return [tw // 2, tw - tw // 2, th // 2, th - th // 2]
    pad = _pair(padding)
    if len(pad) != 2 or min(pad) < 0:
        raise ValueError(f"padding must be a non-negative int or pair, got {padding!r}")
    return pad


def sketch_mix_weight(U1: Tensor) -> Tensor:
    """The 1×1 channel-mix kernel (O, 2Lk, 1, 1) of the sketch: W[o, i·k + j] = U1[i, j, o] / (2L).

    With G groups it is applied as a grouped 1×1 conv: output channel o (in group g) mixes group g's 2Lk
    sketch channels, which is why one U1 (2L, k, O) serves every group."""
    T2, k, O = U1.shape
    return (U1.permute(2, 0, 1).reshape(O, T2 * k, 1, 1) / T2).contiguous()


def _split_padding(padding: Sequence[int]) -> tuple[list[int] | None, list[int]]:
    """(extra F.pad of the input or None, symmetric padding for the convolution)."""
    if len(padding) == 2:
        return None, list(padding)
    left, right, top, bottom = padding
    ph, pw = min(top, bottom), min(left, right)
    extra = [left - pw, right - pw, top - ph, bottom - ph]
    return (extra if any(extra) else None), [ph, pw]


def _check_common(name: str, x: Tensor, first: Tensor, bias: Optional[Tensor], out_channels: int,
                  stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], groups: int) -> None:
    torch._check(x.dim() == 4, lambda: f"{name}: x must be (N, C, H, W), got {x.dim()}-D")
    torch._check(first.dim() == 4, lambda: f"{name}: the filters must be 4-D, got {tuple(first.shape)}")
    torch._check(groups >= 1, lambda: f"{name}: groups must be >= 1, got {groups}")
    torch._check(x.shape[1] == first.shape[1] * groups,
                 lambda: f"{name}: x has {x.shape[1]} channels but the filters {tuple(first.shape)} with "
                         f"groups={groups} expect {first.shape[1] * groups}")
    torch._check(first.shape[0] % groups == 0 and out_channels % groups == 0,
                 lambda: f"{name}: filters ({first.shape[0]}) and output channels ({out_channels}) must be "
                         f"divisible by groups={groups}")
    torch._check(len(stride) == 2 and len(dilation) == 2 and len(padding) in (2, 4),
                 lambda: f"{name}: stride and dilation need 2 ints and padding 2 or 4 (see conv_padding)")
    torch._check(x.dtype == first.dtype, lambda: f"{name}: dtypes differ: x {x.dtype}, filters {first.dtype}")
    if bias is not None:
        torch._check(bias.shape == (out_channels,),
                     lambda: f"{name}: bias must have shape ({out_channels},), got {tuple(bias.shape)}")
        torch._check(bias.dtype == x.dtype, lambda: f"{name}: bias dtype {bias.dtype} differs from x {x.dtype}")


def _conv_mix(x: Tensor, filters: Tensor, mix: Tensor, bias: Optional[Tensor], stride, padding, dilation,
              groups: int) -> Tensor:
    """conv(x, filters) then the grouped 1×1 conv with ``mix`` (O, m/G, 1, 1) and the bias."""
    extra, pad = _split_padding(padding)
    if extra is not None:
        x = F.pad(x, extra)
    z = F.conv2d(x, filters, None, stride, pad, dilation, groups)
    return F.conv2d(z, mix, bias, 1, 0, 1, groups)


def _conv_mix_backward(gy: Tensor, x: Tensor, filters: Tensor, mix: Tensor, has_bias: bool, stride, padding,
                       dilation, groups: int, need_x: bool, need_filters: bool, need_mix: bool, need_bias: bool):
    """Gradients (x, filters, mix, bias) of :func:`_conv_mix`; z is recomputed only when ``mix`` needs it."""
    extra, pad = _split_padding(padding)
    xp = F.pad(x, extra) if extra is not None else x
    conv_bw = torch.ops.aten.convolution_backward.default
    if need_mix:
        z = F.conv2d(xp, filters, None, stride, pad, dilation, groups)
    else:  # convolution_backward only reads the input's shape for the input gradient
        z = gy.new_empty((gy.shape[0], filters.shape[0], gy.shape[2], gy.shape[3]))
    bias_sizes = [mix.shape[0]] if has_bias else None
    gz, gmix, gbias = conv_bw(gy, z, mix, bias_sizes, [1, 1], [0, 0], [1, 1], False, [0, 0], groups,
                              [need_x or need_filters, need_mix, has_bias and need_bias])
    gx = gfilters = None
    if need_x or need_filters:
        gxp, gfilters, _ = conv_bw(gz, xp, filters, None, list(stride), pad, list(dilation), False, [0, 0], groups,
                                   [need_x, need_filters, False])
        if need_x and extra is not None:
            gx = gxp[:, :, extra[2]:extra[2] + x.shape[2], extra[0]:extra[0] + x.shape[3]]
        else:
            gx = gxp
    return gx, gfilters, gmix, gbias


# ---- lowrank_conv2d ---------------------------------------------------------------------------------------

def _check_lowrank(x, V, U, bias, stride, padding, dilation, groups) -> None:
    name = "lowrank_conv2d"
    torch._check(U.dim() in (2, 4), lambda: f"{name}: U must be (O, r/G) or (O, r/G, 1, 1), got {tuple(U.shape)}")
    _check_common(name, x, V, bias, U.shape[0], stride, padding, dilation, groups)
    torch._check(U.shape[1] * groups == V.shape[0] and (U.dim() == 2 or U.shape[2:] == (1, 1)),
                 lambda: f"{name}: U {tuple(U.shape)} (O, r/G[, 1, 1]) does not fit V {tuple(V.shape)} "
                         f"(r, C/G, kh, kw) with groups={groups}")
    torch._check(U.dtype == x.dtype, lambda: f"{name}: U dtype {U.dtype} differs from x {x.dtype}")


def _lowrank_mix(U: Tensor) -> Tensor:
    return U.reshape(U.shape[0], U.shape[1], 1, 1)


def lowrank_conv2d_body(x: Tensor, V: Tensor, U: Tensor, bias: Optional[Tensor], stride: Sequence[int],
                   padding: Sequence[int], dilation: Sequence[int], groups: int) -> Tensor:
    """y = conv1x1(conv(x, V; stride, padding, dilation, groups), U; groups) + bias.

    Shapes: x (N, C, H, W), V (r, C/G, kh, kw), U (O, r/G) or (O, r/G, 1, 1), bias (O,) -> y (N, O, H', W').
    A rank-r factorization of the kernel reshaped per group to (O/G, C/G·kh·kw): K_g ≈ U_g V_g.
    """
    _check_lowrank(x, V, U, bias, stride, padding, dilation, groups)
    return _conv_mix(x, V, _lowrank_mix(U), bias, stride, padding, dilation, groups)


def _lowrank_fake(x, V, U, bias, stride, padding, dilation, groups):
    _check_lowrank(x, V, U, bias, stride, padding, dilation, groups)
    # The same ATen composition on fake tensors: shapes and memory format match the real op's.
    return _conv_mix(x, V, _lowrank_mix(U), bias, stride, padding, dilation, groups)


lowrank_conv2d = define_op(f"lowrank_conv2d(Tensor x, Tensor V, Tensor U, Tensor? bias, {_GEOMETRY}) -> Tensor",
                           lowrank_conv2d_body, _lowrank_fake)


def _conv_setup(ctx, inputs, output):
    """Both conv ops: save (x, first-conv weight, mix factor) and the convolution geometry."""
    x, first, mix, bias, stride, padding, dilation, groups = inputs
    ctx.save_for_backward(x, first, mix)
    ctx.conv = (bias is not None, list(stride), list(padding), list(dilation), groups)


def _lowrank_backward(ctx, gy):
    x, V, U = ctx.saved_tensors
    need_x, need_V, need_U, need_bias = ctx.needs_input_grad[:4]
    gx, gV, gmix, gbias = _conv_mix_backward(gy, x, V, _lowrank_mix(U), *ctx.conv, need_x, need_V, need_U,
                                             need_bias)
    gU = gmix.reshape(U.shape) if gmix is not None else None
    return gx, gV, gU, gbias, None, None, None, None


register_autograd("lowrank_conv2d", _lowrank_backward, _conv_setup)
autocast_to_lower_precision("panther::lowrank_conv2d")


# ---- sketched_conv2d --------------------------------------------------------------------------------------

def _check_sketched(x, S1, U1, bias, stride, padding, dilation, groups) -> None:
    name = "sketched_conv2d"
    torch._check(U1.dim() == 3, lambda: f"{name}: U1 must be (2L, k, O), got {tuple(U1.shape)}")
    _check_common(name, x, S1, bias, U1.shape[2], stride, padding, dilation, groups)
    torch._check(S1.shape[0] == groups * U1.shape[0] * U1.shape[1],
                 lambda: f"{name}: S1 has {S1.shape[0]} filters but U1 {tuple(U1.shape)} (2L, k, O) with "
                         f"groups={groups} needs G·2L·k = {groups * U1.shape[0] * U1.shape[1]}")
    torch._check(U1.dtype == x.dtype, lambda: f"{name}: U1 dtype {U1.dtype} differs from x {x.dtype}")


def sketched_conv2d_body(x: Tensor, S1: Tensor, U1: Tensor, bias: Optional[Tensor], stride: Sequence[int],
                         padding: Sequence[int], dilation: Sequence[int], groups: int) -> Tensor:
    """Panther SKConv2d: y = 1/(2L) Σ_i U1_iᵀ ⋆ conv(x, S1_i) + bias, per group.

    Shapes: x (N, C, H, W), S1 (G·2L·k, C/G, kh, kw), U1 (2L, k, O), bias (O,) -> y (N, O, H', W').
    Computed as one conv with G·2Lk filters and one grouped 1×1 conv, not 2L small ones.
    """
    _check_sketched(x, S1, U1, bias, stride, padding, dilation, groups)
    return _conv_mix(x, S1, sketch_mix_weight(U1), bias, stride, padding, dilation, groups)


def _sketched_fake(x, S1, U1, bias, stride, padding, dilation, groups):
    _check_sketched(x, S1, U1, bias, stride, padding, dilation, groups)
    return _conv_mix(x, S1, sketch_mix_weight(U1), bias, stride, padding, dilation, groups)


sketched_conv2d = define_op(f"sketched_conv2d(Tensor x, Tensor S1, Tensor U1, Tensor? bias, {_GEOMETRY}) -> Tensor",
                            sketched_conv2d_body, _sketched_fake)


def _sketched_backward(ctx, gy):
    x, S1, U1 = ctx.saved_tensors
    need_x, need_S1, need_U1, need_bias = ctx.needs_input_grad[:4]
    gx, gS1, gmix, gbias = _conv_mix_backward(gy, x, S1, sketch_mix_weight(U1), *ctx.conv, need_x, need_S1,
                                              need_U1, need_bias)
    gU1 = None
    if gmix is not None:  # mix[o, i·k + j] = U1[i, j, o] / (2L)
        T2, k, O = U1.shape
        gU1 = gmix.reshape(O, T2, k).permute(1, 2, 0).div(T2)
    return gx, gS1, gU1, gbias, None, None, None, None


register_autograd("sketched_conv2d", _sketched_backward, _conv_setup)
autocast_to_lower_precision("panther::sketched_conv2d")
