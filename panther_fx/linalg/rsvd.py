"""Randomized SVD (Halko, Martinsson, Tropp 2011, Alg. 4.4 + 5.1) with QR-stabilized power iterations."""

from __future__ import annotations

import torch
from torch import Tensor

from ._random import as_generator

__all__ = ["rsvd"]


def rsvd(A: Tensor, rank: int, *, oversample: int = 10, n_iter: int = 2,
         generator: torch.Generator | int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Rank-``rank`` SVD of A (..., m, n) -> (U (..., m, rank), S (..., rank), Vh (..., rank, n)).

    Range finder: Y = A Ω with a Gaussian Ω (n, rank + oversample), then ``n_iter`` power iterations
    Y <- A (Aᵀ Q), re-orthonormalized by QR after every product so that the small singular values
    are not lost to rounding. Then B = Qᵀ A, SVD of the small B, U = Q Ũ.
    """
    if A.dim() < 2:
        raise ValueError(f"rsvd: A must be at least 2-D, got shape {tuple(A.shape)}")
    m, n = A.shape[-2:]
    if not 1 <= rank <= min(m, n):
        raise ValueError(f"rsvd: rank must lie in [1, min(m, n) = {min(m, n)}], got {rank}")
    if not torch.isfinite(A).all():
        raise ValueError("rsvd: A contains NaN or Inf")
    if m < n:  # work on the tall orientation so Q is (m, l) with l <= n
        U, S, Vh = rsvd(A.mT, rank, oversample=oversample, n_iter=n_iter, generator=generator)
        return Vh.mT, S, U.mT
    width = min(rank + oversample, n)
    gen = as_generator(generator)
    omega = torch.randn(*A.shape[:-2], n, width, generator=gen, device=gen.device, dtype=A.dtype).to(A.device)
    Q = torch.linalg.qr(A @ omega).Q
    for _ in range(n_iter):
        Q = torch.linalg.qr(A.mT @ Q).Q
        Q = torch.linalg.qr(A @ Q).Q
    Ub, S, Vh = torch.linalg.svd(Q.mT @ A, full_matrices=False)
    return (Q @ Ub)[..., :rank], S[..., :rank], Vh[..., :rank, :]
