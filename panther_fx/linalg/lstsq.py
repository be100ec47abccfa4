"""Sketched least squares for tall A (m, n): min_x ‖A x − b‖₂.

``method="precondition"`` (sketch-and-precondition, Blendenpik / LSRN style; Avron, Maymounkov, Toledo 2010):
sketch S A (d = min(m, 4n) rows by default; d = m means no sketch, S = I), R from the QR of S A, so that A R⁻¹ is well conditioned whatever
cond(A) is; start from the sketch-and-solve solution x₀ = R⁻¹ Q_skᵀ S b, then LSQR (Paige, Saunders 1982)
on min_y ‖A R⁻¹ y − (b − A x₀)‖ and x = x₀ + R⁻¹ y. LSQR converges in O(log 1/tol) iterations because
the preconditioned condition number is a small constant. Everything runs in float64 (an fp32 A is
upcast once), so the residual matches ``torch.linalg.lstsq`` in float64 up to the rounding of x to the
output dtype (float32 for float32 inputs).

``method="sketch"`` (sketch-and-solve): x₀ alone, cheap, with residual within a factor (1 + O(√(n/d))).
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor

from .._checks import is_int
from ._random import as_generator
from .sketch import SKETCHES, make_sketch

__all__ = ["sketched_lstsq"]

METHODS = ("precondition", "sketch")


def _check(A: Tensor, b: Tensor, sketch: str, method: str, tol: float, max_iter: int) -> None:
    if not isinstance(A, Tensor) or A.dim() != 2:
        raise ValueError(f"sketched_lstsq: A must be a 2-D tensor, got shape {tuple(getattr(A, 'shape', ()))}")
    m, n = A.shape
    if m < n or n < 1:
        raise ValueError(f"sketched_lstsq: A must be tall (m >= n >= 1), got shape {(m, n)}")
    if not isinstance(b, Tensor) or b.dim() not in (1, 2) or b.shape[0] != m:
        raise ValueError(f"sketched_lstsq: b must be ({m},) or ({m}, k) to match A {(m, n)}, got "
                         f"{tuple(getattr(b, 'shape', ()))}")
    if b.device != A.device:
        raise ValueError(f"sketched_lstsq: b is on {b.device} but A is on {A.device}; move them to one device")
    for name, t in (("A", A), ("b", b)):
        if t.dtype not in (torch.float32, torch.float64):
            raise ValueError(f"sketched_lstsq: {name} must be float32 or float64, got {t.dtype}")
        if not torch.isfinite(t).all():
            raise ValueError(f"sketched_lstsq: {name} contains NaN or Inf")
    if sketch not in SKETCHES:
        raise ValueError(f"sketched_lstsq: unknown sketch {sketch!r}; expected one of {sorted(SKETCHES)}")
    if method not in METHODS:
        raise ValueError(f"sketched_lstsq: unknown method {method!r}; expected one of {METHODS}")
    if not is_int(max_iter) or max_iter < 1:
        raise ValueError(f"sketched_lstsq: max_iter must be an int >= 1, got {max_iter!r}")
    if not (isinstance(tol, (int, float)) and math.isfinite(tol) and tol > 0):
        raise ValueError(f"sketched_lstsq: tol must be a finite number > 0, got {tol!r}")


@torch.no_grad()
def sketched_lstsq(A: Tensor, b: Tensor, *, sketch: str = "sparse_sign", method: str = "precondition",
                   sketch_size: int | None = None, generator: torch.Generator | int | None = None,
                   tol: float = 1e-10, max_iter: int = 200) -> Tensor:
    """Least-squares solution x (n,) or (n, k) of A (m, n) x ≈ b (m,) or (m, k); A must have full column rank.

    ``sketch_size`` d defaults to min(m, 4n); at d = m a sketch saves nothing (and a square S may be singular),
    so A is its own sketch: R from A's QR and x₀ already solves the problem. ``tol`` (> 0) drives LSQR's
    stopping tests on the preconditioned Ā = A R⁻¹, for every column of b: ‖Āᵀ r‖ <= tol ‖Ā‖ ‖r‖, or
    ‖r‖ <= tol ‖b − A x₀‖ (consistent systems); about 20 iterations at the default, whatever cond(A).
    ``max_iter`` (>= 1) bounds the iterations. The result has b's dtype promoted with A's. ``generator``: a
    ``torch.Generator`` (used on its own device) or a seed for a new generator on A's device.

    A sketch's R that looks rank deficient may be the sketch's fault, not A's: A's own QR then decides, and
    only a rank-deficient A is refused.
    """
    _check(A, b, sketch, method, tol, max_iter)
    m, n = A.shape
    d = sketch_size if sketch_size is not None else min(m, 4 * n)
    if not n <= d <= m:
        raise ValueError(f"sketched_lstsq: sketch_size must lie in [n, m] = [{n}, {m}], got {d}")
    out_dtype = torch.promote_types(A.dtype, b.dtype)
    A64, B = A.double(), (b.double()[:, None] if b.dim() == 1 else b.double())
    S = None
    if d < m:
        S = make_sketch(sketch, d, m, generator=as_generator(generator, A.device), dtype=torch.float64,
                        device=A.device)
    Q_sk, R = torch.linalg.qr(A64 if S is None else S.apply(A64, dim=0))
    if S is not None and (_rank_deficient(R, d) or _preconditioned_norm(A64, R) > MAX_DISTORTION):
        # The sketch lost rank, or failed to embed A's column space (a CountSketch of a coherent A: R nearly
        # singular without looking so, and LSQR's stopping tests then pass on a wrong x): decide on A itself.
        S = None
        Q_sk, R = torch.linalg.qr(A64)
    if _rank_deficient(R, m):
        diag = R.diagonal().abs()
        raise ValueError(f"sketched_lstsq: A {(m, n)} is numerically rank deficient (R diagonal ratio "
                         f"{(diag.min() / diag.max()).item():.1e} in A's own QR); use cqrrpt or torch.linalg.lstsq")
    X = torch.linalg.solve_triangular(R, Q_sk.mT @ (B if S is None else S.apply(B, dim=0)), upper=True)
    if method == "precondition":
        Y, converged = _lsqr(A64, R, B - A64 @ X, tol, max_iter)
        if not converged:
            warnings.warn(f"sketched_lstsq: LSQR did not reach tol = {tol:g} in max_iter = {max_iter} "
                          "iterations", RuntimeWarning, stacklevel=3)  # past torch.no_grad's wrapper
        X = X + torch.linalg.solve_triangular(R, Y, upper=True)
    X = X.to(out_dtype)
    return X[:, 0] if b.dim() == 1 else X


MAX_DISTORTION = 10.0
"""Largest ‖A R⁻¹‖₂ accepted from a sketch's R: a subspace embedding of A's column space gives about 1–2
(at the default d = 4n); far more means the sketch missed a direction of A, whose R⁻¹ then blows it up."""


def _preconditioned_norm(A: Tensor, R: Tensor, iterations: int = 8) -> float:
    """‖A R⁻¹‖₂ estimated by power iteration from a fixed start (two products with A per iteration, as one
    LSQR step: cheap next to the solve)."""
    generator = torch.Generator(device=A.device).manual_seed(0)
    v = torch.randn(R.shape[0], 1, dtype=A.dtype, device=A.device, generator=generator)
    square = v.new_zeros(())
    for _ in range(iterations):
        v = v / v.norm().clamp_min(torch.finfo(A.dtype).tiny)
        u = A @ torch.linalg.solve_triangular(R, v, upper=True)
        v = torch.linalg.solve_triangular(R.mT, A.mT @ u, upper=False)
        square = v.norm()
    return math.sqrt(float(square))


def _rank_deficient(R: Tensor, rows: int) -> bool:
    """Whether the QR's R of a (rows, n) matrix is numerically singular: Householder rounding grows with rows."""
    diag = R.diagonal().abs()
    return bool(diag.min() <= rows * torch.finfo(torch.float64).eps * diag.max())


def _lsqr(A: Tensor, R: Tensor, B: Tensor, tol: float, max_iter: int) -> tuple[Tensor, bool]:
    """LSQR on min_Y ‖A R⁻¹ Y − B‖ for every column of B at once (scalars become (k,) vectors); returns Y and
    whether every column met a stopping test within ``max_iter`` iterations."""
    def op(V: Tensor) -> Tensor:
        return A @ torch.linalg.solve_triangular(R, V, upper=True)

    def op_t(U: Tensor) -> Tensor:
        return torch.linalg.solve_triangular(R.mT, A.mT @ U, upper=False)

    tiny = torch.finfo(B.dtype).tiny

    def normalize(V: Tensor) -> tuple[Tensor, Tensor]:
        norm = V.norm(dim=0)
        return V / norm.clamp_min(tiny), norm

    U, beta = normalize(B)
    bnorm = beta
    V, alpha = normalize(op_t(U))
    W = V.clone()
    Y = torch.zeros_like(V)
    phibar, rhobar = beta, alpha
    anorm2 = torch.zeros_like(alpha)
    for _ in range(max_iter):
        U, beta = normalize(op(V) - alpha * U)
        anorm2 = anorm2 + alpha ** 2 + beta ** 2
        V, alpha_next = normalize(op_t(U) - beta * V)
        rho = torch.sqrt(rhobar ** 2 + beta ** 2).clamp_min(tiny)
        c, s = rhobar / rho, beta / rho
        theta, rhobar, phi, phibar = s * alpha_next, -c * alpha_next, c * phibar, s * phibar
        Y = Y + (phi / rho) * W
        W = V - (theta / rho) * W
        alpha = alpha_next
        # Paige & Saunders' tests: ‖Āᵀ r‖ = phibar·alpha·|c| small against ‖Ā‖‖r‖ (inconsistent b),
        # or ‖r‖ = phibar small against ‖b‖ (consistent b, where ‖Āᵀ r‖/‖r‖ need not shrink).
        optimal = alpha * c.abs() <= tol * anorm2.sqrt()
        consistent = phibar <= tol * bnorm
        if bool((optimal | consistent).all()):
            return Y, True
    return Y, False
