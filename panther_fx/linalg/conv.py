"""Factorizations of Conv2d kernels, shared by the backend's conv2d rewrite and the ``panther_fx.nn`` conv
modules' ``from_dense``.

A (possibly grouped) kernel K (O, C/G, kh, kw) with G groups is G independent kernels K_g (O/G, C/G, kh, kw):
output channels [g·O/G, (g+1)·O/G) see only input channels [g·C/G, (g+1)·C/G). Every factorization here is
done per group, so the factored layer keeps that block structure exactly:

- svd: K_g reshaped to (O/G, C/G·kh·kw) ≈ U_g V_g with rank r_g = r/G. ``V`` (r, C/G, kh, kw) stacks the V_g
  (a grouped conv with r filters) and ``U`` (O, r/G, 1, 1) stacks the U_g (a grouped 1×1 conv).
- sketch (Panther SKConv2d, output-channel sketch): 2L sign matrices U1_i (k, O) with entries ±1/√k;
  S1 (G·2Lk, C/G, kh, kw) holds, for group g and term i, S1_{g,i} = U1_i[:, group g] ×_out K_g. The layer is
  y = 1/(2L) Σ_i U1_iᵀ ⋆ conv(x, S1_i) + b, an unbiased estimate of the dense conv.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._checks import is_int
from ._random import as_generator, random_signs
from ..ops.conv2d import sketch_mix_weight
from .lowrank import svd_factors

__all__ = ["conv_svd_factors", "conv_sketch_factors", "conv_weight_from_lowrank", "conv_weight_from_sketch",
           "group_rank"]


def _check_groups(fn: str, out_channels: int, groups: int) -> None:
    if not is_int(groups) or groups < 1 or out_channels % groups:
        raise ValueError(f"{fn}: groups = {groups!r} must divide the {out_channels} output channels of the kernel")


def group_rank(rank: int, out_channels: int, in_features: int, groups: int) -> int:
    """Rank per group for a total ``rank``: round(rank/G), at least 1, at most min(O/G, C/G·kh·kw)."""
    return max(1, min(round(rank / groups), out_channels // groups, in_features))


@torch.no_grad()
def conv_svd_factors(K: Tensor, rank: int, *, groups: int = 1, oversample: int = 10, n_iter: int = 2,
                     generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """K (O, C/G, kh, kw) ≈ conv(·, V) then 1×1 conv(·, U): V (G·r_g, C/G, kh, kw), U (O, r_g, 1, 1).

    ``rank`` is the total rank over all groups; each group gets ``r_g = group_rank(rank, ...)`` and its
    optimal rank-r_g approximation (:func:`~panther_fx.linalg.svd_factors` of the reshaped K_g).
    """
    O, Cg, kh, kw = K.shape
    _check_groups("conv_svd_factors", O, groups)
    r_g = group_rank(rank, O, Cg * kh * kw, groups)
    Og = O // groups
    Vs, Us = [], []
    for g in range(groups):
        A, B = svd_factors(K[g * Og:(g + 1) * Og].reshape(Og, -1), r_g, oversample=oversample, n_iter=n_iter,
                           generator=generator)
        Us.append(A)
        Vs.append(B.reshape(r_g, Cg, kh, kw))
    V = torch.cat(Vs).contiguous()
    U = torch.cat(Us).reshape(O, r_g, 1, 1).contiguous()
    return V, U


def conv_weight_from_lowrank(V: Tensor, U: Tensor, groups: int = 1) -> Tensor:
    """The dense kernel (O, C/G, kh, kw) that ``(V, U)`` represent (U (O, r/G) or (O, r/G, 1, 1))."""
    r, Cg, kh, kw = V.shape
    O = U.shape[0]
    r_g, Og = r // groups, O // groups
    U3 = U.reshape(groups, Og, r_g)
    V3 = V.reshape(groups, r_g, Cg * kh * kw)
    return torch.bmm(U3, V3).reshape(O, Cg, kh, kw)


@torch.no_grad()
def conv_sketch_factors(K: Tensor, num_terms: int, low_rank: int, *, groups: int = 1,
                        generator: torch.Generator | int | None) -> tuple[Tensor, Tensor]:
    """Panther SKConv2d factors of K (O, C/G, kh, kw): S1 (G·2Lk, C/G, kh, kw) and U1 (2L, k, O).

    U1 holds 2L = 2·``num_terms`` sign matrices with entries ±1/√k (k = ``low_rank``), drawn from
    ``generator`` (a ``torch.Generator`` or a seed for a CPU generator); S1_{g,i}[j] = Σ_{o in group g} U1_i[j, o] K[o]
    in float32 (float64 stays float64).
    """
    generator = as_generator(generator)
    O, Cg, kh, kw = K.shape
    _check_groups("conv_sketch_factors", O, groups)
    T2, k, Og = 2 * num_terms, low_rank, O // groups
    work = torch.float64 if K.dtype == torch.float64 else torch.float32
    U1 = random_signs((T2, k, O), generator=generator, scale=k ** -0.5, dtype=work, device=K.device)
    Kg = K.detach().to(work).reshape(groups, Og, Cg * kh * kw)
    U1g = U1.reshape(T2 * k, groups, Og).transpose(0, 1)  # (G, 2Lk, O/G): group g's columns of every U1_i
    S1 = torch.bmm(U1g, Kg).reshape(groups * T2 * k, Cg, kh, kw)
    return S1.to(K.dtype).contiguous(), U1.to(K.dtype).contiguous()


def conv_weight_from_sketch(S1: Tensor, U1: Tensor, groups: int = 1) -> Tensor:
    """The dense kernel (O, C/G, kh, kw) the sketch factors represent: per group, mix ᵀ S1_g."""
    _, Cg, kh, kw = S1.shape
    O = U1.shape[2]
    m = U1.shape[0] * U1.shape[1]
    W = sketch_mix_weight(U1).reshape(groups, O // groups, m)
    return torch.bmm(W, S1.reshape(groups, m, Cg * kh * kw)).reshape(O, Cg, kh, kw)
