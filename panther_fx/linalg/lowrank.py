"""Factorizations of dense weights, shared by the backend's rewrites and the modules' ``from_dense``.

svd_factors and sketch_factors compute in float32 (float64 stays float64), asvd_factors and whitening in float64
(its triangular solve amplifies rounding), all on the weight's device; the factors are cast back to the weight's
dtype, so a bf16 model is factorized as accurately as its weights allow.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._checks import is_int
from ._random import as_generator, random_signs
from .rsvd import rsvd

__all__ = ["svd_factors", "asvd_factors", "whitening", "sketch_factors", "sketch_weight", "EXACT_SVD_MAX_DIM",
           "ASVD_DAMPING"]

EXACT_SVD_MAX_DIM = 1024
"""Matrices whose smaller side is at most this use the exact SVD: it is fast there and optimal."""

ASVD_DAMPING = 1e-4
"""Default damping of :func:`asvd_factors`, relative to the mean diagonal of XᵀX."""


def _check_rank(fn: str, W: Tensor, rank: int) -> None:
    """A negative rank would slice from the end (U[:, :-2]) and one above min(O, I) would be silently cut."""
    smallest = min(W.shape)
    if not is_int(rank) or not 1 <= rank <= smallest:
        raise ValueError(f"{fn}: rank must be an int in [1, min(O, I) = {smallest}], got {rank!r}")


def _work_dtype(W: Tensor) -> torch.dtype:
    return torch.float64 if W.dtype == torch.float64 else torch.float32


@torch.no_grad()
def svd_factors(W: Tensor, rank: int, *, oversample: int = 10, n_iter: int = 2,
                generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """W (O, I) ≈ A @ B with A (O, r) = U √S and B (r, I) = √S Vh from a rank-r SVD.

    Exact ``torch.linalg.svd`` when min(O, I) <= ``EXACT_SVD_MAX_DIM`` or the sketch would cover more
    than a quarter of the smaller side; otherwise :func:`~panther_fx.linalg.rsvd`.
    """
    _check_rank("svd_factors", W, rank)
    Wf = W.detach().to(_work_dtype(W))
    smallest = min(Wf.shape)
    if smallest <= EXACT_SVD_MAX_DIM or 4 * (rank + oversample) >= smallest:
        U, S, Vh = torch.linalg.svd(Wf, full_matrices=False)
        U, S, Vh = U[:, :rank], S[:rank], Vh[:rank]
    else:
        U, S, Vh = rsvd(Wf, rank, oversample=oversample, n_iter=n_iter, generator=generator)
    root = S.sqrt()
    A = (U * root).to(W.dtype).contiguous()
    B = (root[:, None] * Vh).to(W.dtype).contiguous()
    return A, B


@torch.no_grad()
def whitening(gram: Tensor, *, damping: float | None = None) -> Tensor:
    """Lower-triangular S (I, I) with S Sᵀ = XᵀX + λI, λ = ``damping`` · mean(diag(XᵀX)), in float64
    (``damping=None``: :data:`ASVD_DAMPING`).

    For any M (O, I): ‖M Xᵀ‖_F² = tr(M XᵀX Mᵀ) ≈ ‖M S‖_F², so errors measured through S are errors on the
    calibration inputs. The damping keeps S invertible when some input directions were never seen.
    """
    damping = ASVD_DAMPING if damping is None else damping
    G = gram.detach().to(torch.float64)
    G = (G + G.T) / 2
    lam = damping * G.diagonal().mean().clamp_min(torch.finfo(torch.float64).tiny)
    eye = torch.eye(G.shape[0], dtype=G.dtype, device=G.device)
    S, info = torch.linalg.cholesky_ex(G + lam * eye)
    if info.item() != 0:
        raise ValueError(f"whitening: XᵀX + λI is not positive definite (λ = {lam.item():.3g}); "
                         "increase the damping")
    return S


@torch.no_grad()
def asvd_factors(W: Tensor, gram: Tensor, rank: int, *,
                 damping: float | None = None) -> tuple[Tensor, Tensor]:
    """Activation-aware W (O, I) ≈ A @ B, A (O, r), B (r, I), optimal on the calibration inputs.

    ``gram`` is XᵀX (I, I) of the layer's inputs X (tokens, I). With S = :func:`whitening` (gram),
    W S = U Σ Vᵀ and the rank-r truncation: A = U √Σ, B = √Σ Vᵀ S⁻¹. Then (W - AB) S is the optimal rank-r
    error of W S, i.e. ‖(W - AB) Xᵀ‖_F is minimal over rank-r AB (up to the damping). Computed in float64
    (the triangular solve amplifies rounding), returned in W's dtype.
    """
    O, I = W.shape
    _check_rank("asvd_factors", W, rank)
    if gram.shape != (I, I):
        raise ValueError(f"asvd_factors: gram is {tuple(gram.shape)}, expected ({I}, {I}) for a weight {(O, I)}")
    S = whitening(gram.to(W.device), damping=damping)
    U, sigma, Vh = torch.linalg.svd(W.detach().to(torch.float64) @ S, full_matrices=False)
    root = sigma[:rank].sqrt()
    A = U[:, :rank] * root
    # B = √Σ Vᵀ S⁻¹, i.e. B S = √Σ Vᵀ: a triangular solve from the right, no explicit inverse.
    B = torch.linalg.solve_triangular(S, root[:, None] * Vh[:rank], upper=False, left=False)
    return A.to(W.dtype).contiguous(), B.to(W.dtype).contiguous()


@torch.no_grad()
def sketch_factors(W: Tensor, num_terms: int, low_rank: int, *,
                   generator: torch.Generator | int | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Panther/Kasiviswanathan sketch of W (O, I) -> (S1 (L, I, k), S2 (L, k, O), U1 (L, k, O), U2 (L, I, k)).

    U1_i and U2_i are fixed ±1/√k sign matrices; S1_i = Wᵀ U1_iᵀ and S2_i = U2_iᵀ Wᵀ, so that
    1/(2L) Σ_i (S1_i U1_i + U2_i S2_i) is an unbiased estimate of Wᵀ. ``generator``: a ``torch.Generator``, or
    a seed for a CPU generator (the signs are drawn there and moved, so a seed gives the same factors anywhere).
    """
    generator = as_generator(generator)
    O, I = W.shape
    L, k = num_terms, low_rank
    dtype = _work_dtype(W)
    Wt = W.detach().to(dtype).t()
    scale = k ** -0.5
    U1 = random_signs((L, k, O), generator=generator, scale=scale, dtype=dtype, device=W.device)
    U2 = random_signs((L, I, k), generator=generator, scale=scale, dtype=dtype, device=W.device)
    S1 = Wt @ U1.transpose(1, 2)
    S2 = U2.transpose(1, 2) @ Wt
    return tuple(t.to(W.dtype).contiguous() for t in (S1, S2, U1, U2))


def sketch_weight(S1: Tensor, S2: Tensor, U1: Tensor, U2: Tensor) -> Tensor:
    """The dense (O, I) weight that the sketch factors represent: (1/(2L) Σ_i S1_i U1_i + U2_i S2_i)ᵀ."""
    L = S1.shape[0]
    return ((S1 @ U1 + U2 @ S2).sum(0) / (2 * L)).t()
