"""Trainable factored Conv2d layers whose forward is a single ``torch.ops.panther`` op.

- :class:`LowRankConv2d`: conv with r filters V (r, C/G, kh, kw), then a grouped 1×1 conv U (O, r/G, 1, 1),
  + bias: each group's kernel reshaped to (O/G, C/G·kh·kw) is the rank-r/G product U_g V_g.
- :class:`SKConv2d`: Panther's SKConv2d (output-channel sketch): learned S1s (G·2Lk, C/G, kh, kw), fixed
  ±1/√k signs U1s (2L, k, O) stored as a buffer, y = 1/(2L) Σ_i U1_iᵀ ⋆ conv(x, S1_i) + b.

Both take the ``nn.Conv2d`` constructor arguments (stride, padding int/pair/"same"/"valid", dilation, groups,
bias, padding_mode) and are built from a dense ``nn.Conv2d`` with ``from_dense`` through the same
factorization code as the ``panther`` backend (:mod:`panther_fx.linalg.conv`), or from precomputed factors
(a :class:`~panther_fx.passes.conv2d.ConvPlan`'s) with ``from_factors``.
"""

from __future__ import annotations

import math
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops  # noqa: F401  (registers torch.ops.panther.*)
from ..linalg.conv import (conv_sketch_factors, conv_svd_factors, conv_weight_from_lowrank,
                           conv_weight_from_sketch)
from ..ops.conv2d import conv_padding
from ._init import Seed, check_sizes, seeded_generator, uniform

__all__ = ["LowRankConv2d", "SKConv2d"]

_PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


def _pair(v: int | tuple[int, ...]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


class _FactoredConv2d(nn.Module):
    """Geometry shared by the factored convs: what ``nn.Conv2d`` stores, and the op's canonical padding."""

    def _set_geometry(self, in_channels: int, out_channels: int, kernel_size, stride, padding, dilation,
                      groups: int, padding_mode: str) -> None:
        name = type(self).__name__
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"{name}: in_channels={in_channels} and out_channels={out_channels} must be "
                             f"divisible by groups={groups}")
        if padding_mode not in _PADDING_MODES:
            raise ValueError(f"{name}: padding_mode must be one of {_PADDING_MODES}, got {padding_mode!r}")
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size, self.stride, self.dilation = _pair(kernel_size), _pair(stride), _pair(dilation)
        self.padding = padding if isinstance(padding, str) else _pair(padding)
        self.padding_mode = padding_mode
        canonical = conv_padding(padding, self.kernel_size, self.stride, self.dilation)
        if padding_mode == "zeros":
            self._op_padding = canonical
        else:  # as nn.Conv2d: pad with the mode first, then convolve without padding
            self._mode_padding = canonical if len(canonical) == 4 else [canonical[1]] * 2 + [canonical[0]] * 2
            self._op_padding = [0, 0]

    def _geometry_from(self, conv: nn.Conv2d) -> None:
        self._set_geometry(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                           conv.dilation, conv.groups, conv.padding_mode)

    def _prepare(self, x: Tensor) -> Tensor:
        if self.padding_mode != "zeros":
            x = F.pad(x, self._mode_padding, mode=self.padding_mode)
        return x

    def _run(self, op, x: Tensor, first: Tensor, mix: Tensor) -> Tensor:
        unbatched = x.dim() == 3
        x = self._prepare(x.unsqueeze(0) if unbatched else x)
        y = op(x, first, mix, self.bias, list(self.stride), self._op_padding, list(self.dilation), self.groups)
        return y.squeeze(0) if unbatched else y

    def _set_bias(self, bias: Tensor | None) -> None:
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone().contiguous())

    def _fresh_bias(self, generator: torch.Generator, **factory) -> Tensor:
        """U(±1/√fan_in) with fan_in = C/G·kh·kw, as ``nn.Conv2d`` draws it."""
        bound = 1.0 / math.sqrt(self.in_channels // self.groups * self.kernel_size[0] * self.kernel_size[1])
        return uniform((self.out_channels,), bound, generator, **factory)

    def _conv_like_kernel(self, filters: int, generator: torch.Generator, *, device, dtype) -> Tensor:
        """A (filters, C/G, kh, kw) kernel drawn as ``nn.Conv2d`` draws it: U(±1/√fan_in), on the generator's
        device (:mod:`._init`)."""
        K = torch.empty(filters, self.in_channels // self.groups, *self.kernel_size, dtype=dtype,
                        device=generator.device)
        nn.init.kaiming_uniform_(K, a=math.sqrt(5), generator=generator)
        return K.to(device)

    def _geometry_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, "
                f"bias={self.bias is not None}, padding_mode={self.padding_mode!r}")


class LowRankConv2d(_FactoredConv2d):
    """y = conv1x1(conv(x, V), U) + b: a Conv2d whose per-group kernel (O/G, C/G·kh·kw) has rank r/G.

    Shapes: x (N, C, H, W) -> y (N, O, H', W'); parameters ``V`` (r, C/G, kh, kw), ``U`` (O, r/G, 1, 1),
    ``bias`` (O,). Stored numbers r·C/G·kh·kw + O·r/G (+ O), against O·C/G·kh·kw for ``nn.Conv2d``.
    ``rank`` is the total over the G groups and must be divisible by G.

    Initialisation keeps ``nn.Conv2d``'s output variance: V is drawn like a conv kernel, U(±1/√fan_in), and
    U ~ U(±√(3G/r)), so each entry of the product has variance (r/G)·(G/r)·1/(3·fan_in), that of nn.Conv2d.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int],
                 stride: int | tuple[int, int] = 1, padding: int | tuple[int, int] | str = 0,
                 dilation: int | tuple[int, int] = 1, groups: int = 1, bias: bool = True,
                 padding_mode: str = "zeros", device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None, *, rank: int, seed: Seed = None) -> None:
        super().__init__()
        self._set_geometry(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, padding_mode)
        if rank < 1 or rank % groups:
            raise ValueError(f"LowRankConv2d: rank={rank} must be a positive multiple of groups={groups}")
        factory = {"device": device, "dtype": dtype if dtype is not None else torch.get_default_dtype()}
        generator = seeded_generator(seed)
        V = self._conv_like_kernel(rank, generator, **factory)
        a = math.sqrt(3.0 * groups / rank)
        U = uniform((out_channels, rank // groups, 1, 1), a, generator, **factory)
        self._set_factors(V, U, self._fresh_bias(generator, **factory) if bias else None)

    def _set_factors(self, V: Tensor, U: Tensor, bias: Tensor | None) -> None:
        expected = (self.out_channels, V.shape[0] // self.groups, 1, 1)
        if V.shape[1:] != (self.in_channels // self.groups, *self.kernel_size) or V.shape[0] % self.groups \
                or tuple(U.reshape(U.shape[0], U.shape[1], 1, 1).shape) != expected:
            raise ValueError(f"LowRankConv2d: factors V {tuple(V.shape)}, U {tuple(U.shape)} do not fit "
                             f"{self._geometry_repr()}; need V (r, C/G, kh, kw) and U {expected}")
        self.rank = V.shape[0]
        self.V = nn.Parameter(V.detach().clone().contiguous())
        self.U = nn.Parameter(U.detach().reshape(expected).clone().contiguous())
        self._set_bias(bias)

    @classmethod
    def from_factors(cls, conv: nn.Conv2d, factors: dict[str, Tensor]) -> "LowRankConv2d":
        """A layer with ``conv``'s geometry and bias (copied) holding ``factors`` {"V", "U"} (copied), e.g.
        those of :func:`panther_fx.passes.plan_conv2d`."""
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module._geometry_from(conv)
        module._set_factors(factors["V"], factors["U"], conv.bias)
        return module

    @classmethod
    def from_dense(cls, conv: nn.Conv2d, rank: int, *, oversample: int = 10, n_iter: int = 2,
                   seed: Seed = 0) -> "LowRankConv2d":
        """Best rank-r/G approximation of each group's reshaped kernel of ``conv``
        (:func:`panther_fx.linalg.conv.conv_svd_factors`); the bias is copied. ``rank`` must be a multiple of
        G and at most G · min(O/G, C/G·kh·kw), the full rank."""
        check_sizes("LowRankConv2d.from_dense", rank=rank)
        if rank % conv.groups:
            raise ValueError(f"LowRankConv2d.from_dense: rank={rank} must be a multiple of groups={conv.groups}")
        O, Cg, kh, kw = conv.weight.shape
        full = conv.groups * min(O // conv.groups, Cg * kh * kw)
        if rank > full:  # each group's truncated SVD has at most that many terms: a larger rank would be clamped
            raise ValueError(f"LowRankConv2d.from_dense: rank={rank} exceeds groups · min(O/G, C/G·kh·kw) = {full} "
                             f"of {conv}")
        V, U = conv_svd_factors(conv.weight, rank, groups=conv.groups, oversample=oversample, n_iter=n_iter,
                                generator=seeded_generator(seed))
        return cls.from_factors(conv, {"V": V, "U": U})

    def dense_weight(self) -> Tensor:
        """The (O, C/G, kh, kw) kernel this layer computes with (differentiable in V, U)."""
        return conv_weight_from_lowrank(self.V, self.U, self.groups)

    def forward(self, x: Tensor) -> Tensor:
        return self._run(torch.ops.panther.lowrank_conv2d, x, self.V, self.U)

    def extra_repr(self) -> str:
        return f"{self._geometry_repr()}, rank={self.rank}"


class SKConv2d(_FactoredConv2d):
    """Panther's SKConv2d: y = 1/(2L) Σ_i U1_iᵀ ⋆ conv(x, S1_i) + b, per group.

    Shapes: x (N, C, H, W) -> y (N, O, H', W'); parameters ``S1s`` (G·2Lk, C/G, kh, kw), ``bias`` (O,); buffer
    ``U1s`` (2L, k, O) with entries ±1/√k (L = ``num_terms``, k = ``low_rank``). Stored numbers
    2Lk·(G·C/G·kh·kw + O) (+ O), against O·C/G·kh·kw for ``nn.Conv2d``; at G = 1 the layout is Panther's.

    Initialisation: a kernel drawn as ``nn.Conv2d`` draws it is sketched, and S1s rescaled so the sketched
    kernel keeps its Frobenius norm (the sketch's noise alone inflates it by about √(1 + O/(G·2Lk))). Use
    :meth:`from_dense` to sketch a trained conv unchanged: an unbiased estimate with relative error
    ≈ √(O/(G·2Lk)), a starting point for training rather than post-training compression.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int],
                 stride: int | tuple[int, int] = 1, padding: int | tuple[int, int] | str = 0,
                 dilation: int | tuple[int, int] = 1, groups: int = 1, bias: bool = True,
                 padding_mode: str = "zeros", device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None, *, num_terms: int = 6, low_rank: int = 8,
                 seed: Seed = None) -> None:
        super().__init__()
        self._set_geometry(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, padding_mode)
        if min(num_terms, low_rank) < 1:
            raise ValueError(f"SKConv2d: num_terms={num_terms} and low_rank={low_rank} must be >= 1")
        factory = {"device": device, "dtype": dtype if dtype is not None else torch.get_default_dtype()}
        generator = seeded_generator(seed)
        K = self._conv_like_kernel(out_channels, generator, **factory)
        S1, U1 = conv_sketch_factors(K, num_terms, low_rank, groups=groups, generator=generator)
        with torch.no_grad():
            scale = torch.linalg.vector_norm(K.double()) / torch.linalg.vector_norm(
                conv_weight_from_sketch(S1.double(), U1.double(), groups))
        self._set_factors(S1 * scale.to(S1.dtype), U1, self._fresh_bias(generator, **factory) if bias else None)

    def _set_factors(self, S1: Tensor, U1: Tensor, bias: Tensor | None) -> None:
        T2, k, O = U1.shape
        expected = (self.groups * T2 * k, self.in_channels // self.groups, *self.kernel_size)
        if T2 % 2 or O != self.out_channels or tuple(S1.shape) != expected:
            raise ValueError(f"SKConv2d: factors S1 {tuple(S1.shape)}, U1 {tuple(U1.shape)} do not fit "
                             f"{self._geometry_repr()}; need U1 (2L, k, O) and S1 {expected}")
        self.num_terms, self.low_rank = T2 // 2, k
        self.S1s = nn.Parameter(S1.detach().clone().contiguous())
        self.register_buffer("U1s", U1.detach().clone().contiguous())
        self._set_bias(bias)

    @classmethod
    def from_factors(cls, conv: nn.Conv2d, factors: dict[str, Tensor]) -> "SKConv2d":
        """A layer with ``conv``'s geometry and bias (copied) holding ``factors`` {"S1", "U1"} (copied)."""
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module._geometry_from(conv)
        module._set_factors(factors["S1"], factors["U1"], conv.bias)
        return module

    @classmethod
    def from_dense(cls, conv: nn.Conv2d, num_terms: int = 6, low_rank: int = 8, *, seed: Seed = 0) -> "SKConv2d":
        """Sketch ``conv.weight`` (:func:`panther_fx.linalg.conv.conv_sketch_factors`) and copy its bias."""
        check_sizes("SKConv2d.from_dense", num_terms=num_terms, low_rank=low_rank)
        S1, U1 = conv_sketch_factors(conv.weight, num_terms, low_rank, groups=conv.groups,
                                     generator=seeded_generator(seed))
        return cls.from_factors(conv, {"S1": S1, "U1": U1})

    def dense_weight(self) -> Tensor:
        """The (O, C/G, kh, kw) kernel this layer computes with (differentiable in S1s)."""
        return conv_weight_from_sketch(self.S1s, self.U1s, self.groups)

    def forward(self, x: Tensor) -> Tensor:
        return self._run(torch.ops.panther.sketched_conv2d, x, self.S1s, self.U1s)

    def extra_repr(self) -> str:
        return f"{self._geometry_repr()}, num_terms={self.num_terms}, low_rank={self.low_rank}"
