"""Orthogonal random feature matrices for Performer (FAVOR+) attention.

``orthogonal_features(m, d)`` returns W (m, d) whose rows come in blocks of d mutually orthogonal
directions (the Q factor of a d×d Gaussian matrix), each row rescaled to the norm of an independent
d-dimensional Gaussian vector (chi distributed with d degrees of freedom). Rows are then marginally
N(0, I_d), so exp(wᵀq − |q|²/2) · exp(wᵀk − |k|²/2) is an unbiased estimate of exp(qᵀk), and orthogonality
within a block lowers the estimator's variance (Choromanski et al. 2021, "orthogonal random features").

Randomness comes only from the ``torch.Generator`` passed in; the global RNG is never touched.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._random import as_generator

__all__ = ["orthogonal_features", "redraw_features_"]


@torch.no_grad()
def orthogonal_features(num_features: int, dim: int, *, generator: torch.Generator | int | None = None,
                        scaling: str = "chi", dtype: torch.dtype = torch.float32,
                        device: torch.device | str | None = None) -> Tensor:
    """A (num_features, dim) matrix of orthogonal random features.

    ``scaling="chi"`` (default) gives each row the norm of a fresh Gaussian vector; ``"sqrt"`` gives every
    row the norm √dim (the deterministic variant of the Performer reference code). The draw happens on the
    generator's device in float64 (QR of small blocks is cheap and then exact to float32), then the result
    is cast to ``dtype`` and moved to ``device``.
    """
    if num_features < 1 or dim < 1:
        raise ValueError(f"orthogonal_features: num_features and dim must be >= 1, got {num_features}, {dim}")
    if scaling not in ("chi", "sqrt"):
        raise ValueError(f"orthogonal_features: scaling must be 'chi' or 'sqrt', got {scaling!r}")
    gen = as_generator(generator)
    blocks = -(-num_features // dim)
    gauss = torch.randn(blocks, dim, dim, generator=gen, device=gen.device, dtype=torch.float64)
    q, r = torch.linalg.qr(gauss)
    # Fix the QR sign ambiguity so the distribution is Haar (and independent of the LAPACK implementation).
    q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)
    rows = q.transpose(-2, -1).reshape(blocks * dim, dim)[:num_features]
    if scaling == "chi":
        norms = torch.randn(num_features, dim, generator=gen, device=gen.device, dtype=torch.float64).norm(dim=1)
    else:
        norms = torch.full((num_features,), float(dim) ** 0.5, dtype=torch.float64, device=gen.device)
    return (rows * norms.unsqueeze(1)).to(dtype=dtype, device=device if device is not None else gen.device)


@torch.no_grad()
def redraw_features_(features: Tensor, *, generator: torch.Generator | int | None = None,
                     scaling: str = "chi") -> Tensor:
    """Redraw ``features`` (m, d) in place from ``generator``, keeping its dtype, device and storage.

    In-place matters: a compiled graph holds the feature buffer by reference (a static input under CUDA
    graphs), so redrawing into the same storage takes effect without recompiling.
    """
    m, d = features.shape
    features.copy_(orthogonal_features(m, d, generator=generator, scaling=scaling, dtype=features.dtype,
                                       device=features.device))
    return features
