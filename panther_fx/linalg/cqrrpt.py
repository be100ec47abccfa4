"""CQRRPT: CholeskyQR with randomization and pivoting (Melnichenko, Balabanov, Murray, Demmel, Mahoney,
Luszczek 2023), for tall matrices A (m, n), m >= n.

1. Sketch: A_sk = S A with S (d, m), d = ⌈γ n⌉ (a subspace embedding of range(A)). When d >= m a sketch
   saves nothing and a square S may be singular, so A is its own sketch (A_sk = A).
2. Column-pivoted QR of the small sketch in float64: A_sk[:, piv] = Q_sk R_sk (:func:`qrcp`).
3. Numerical rank k: the length of the leading run of |R_sk[i, i]| >= τ max|R_sk[j, j]| with the RELATIVE
   threshold τ = 2 eps^0.95 of A's dtype (RandLAPACK's choice): 5.3e-7 for float32, 2.7e-15 for float64.
4. Precondition: A_pre = A[:, piv[:k]] R_sk[:k, :k]⁻¹, which is well conditioned whatever cond(A) is.
5. Cholesky QR of A_pre: G = A_preᵀ A_pre = R_cᵀ R_c, Q = A_pre R_c⁻¹, R = R_c R_sk[:k, :].
6. The rank confirmed on R, the factor of A itself: trailing rows with ‖R[i:, :]‖_F <= τ max|R[j, j]| dropped.
7. Only when k < n: the dropped columns must be represented, ‖A[:, piv[k:]] − Q R[:, k:]‖_F <=
   10 √(n−k) τ max|R[j, j]| (:func:`_dropped_columns_represented`). A sketch that lost rank fails this, and the
   factorization is redone with A as its own sketch (a pivoted QR of A: Householder's cost, but exact).

Then A[:, piv] ≈ Q R with Q (m, k) orthonormal and R (k, n) upper trapezoidal, to working precision for the
kept columns and within the bound of step 7 for the dropped ones.
Cost: one sketch, two m·k² passes (triangular solve, Gram) and one GEMM, against Householder QR's 4 m n².
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._random import as_generator
from .sketch import SKETCHES, make_sketch

__all__ = ["QRCP_BACKENDS", "cqrrpt", "qrcp", "rank_threshold"]

QRCP_BACKENDS = ("auto", "scipy", "torch", "lu")


def rank_threshold(dtype: torch.dtype) -> float:
    """τ = 2 eps^0.95: relative diagonal threshold of the sketch's R below which columns are dropped.

    It is relative to max|R[j, j]| (≈ ‖A‖; with the non-monotone ``"lu"`` pivots the largest diagonal entry need
    not be R[0, 0]), so a full-rank float32 matrix with cond(A) up to ~1e6 keeps its
    full rank; an absolute threshold (the prior art) truncates well-conditioned float32 matrices.
    """
    return 2.0 * torch.finfo(dtype).eps ** 0.95


def qrcp(W: Tensor, *, backend: str = "auto") -> tuple[Tensor, Tensor]:
    """Column-pivoted QR of a small W (d, n) -> (R (min(d, n), n), piv (n,)) with W[:, piv] = Q R.

    ``backend``:

    * ``"scipy"``: LAPACK ``geqp3`` on the CPU (W is moved there); |R[i, i]| is non-increasing.
    * ``"torch"``: Householder QR with column pivoting written in PyTorch, on W's device, no host syncs;
      the same pivots as ``geqp3``, but n steps of small kernels.
    * ``"lu"`` (LUQR): the pivots of LU with partial pivoting of Wᵀ (``getrf``), then an unpivoted Householder
      QR of W[:, piv], both on W's device without host syncs. Each LU step takes the column with the largest
      entry in one row of the eliminated W rather than the largest norm, so |R[i, i]| is not monotone; the
      first k columns of an exactly rank-k W are independent.
    * ``"auto"``: ``"lu"`` for a W on an accelerator (a host ``geqp3`` round trip of a 640 × 512 sketch cost
      more than all of CQRRPT's device work on an H100); ``"scipy"`` on the CPU, ``"torch"`` without SciPy.

    Computed in float64.
    """
    if backend not in QRCP_BACKENDS:
        raise ValueError(f"qrcp: backend must be one of {QRCP_BACKENDS}, got {backend!r}")
    W = W.detach().double()
    if backend == "lu" or (backend == "auto" and W.device.type != "cpu"):
        return _qrcp_lu(W)
    if backend != "torch":
        try:
            import scipy.linalg
        except ImportError:
            if backend == "scipy":
                raise
        else:
            R, piv = scipy.linalg.qr(W.cpu().numpy(), mode="r", pivoting=True)
            R = torch.from_numpy(R[:min(W.shape)])
            return R.to(W.device), torch.from_numpy(piv).to(W.device, torch.int64)
    return _qrcp_torch(W)


LU_ORDER_JUMP = 1e3
"""A diagonal entry of LUQR's R this many times larger than an earlier one means the LU order is not
rank-revealing: :func:`_qrcp_lu` then redoes the pivoting with Householder QRCP."""


def _qrcp_lu(W: Tensor) -> tuple[Tensor, Tensor]:
    """LUQR: Wᵀ = P L U with partial pivoting, so the rows of Pᵀ Wᵀ are W's columns in pivot order.

    Partial pivoting picks a column by one coordinate: when every remaining column is zero there (diag(1, 0, 1)),
    it takes the next column, dependent or not, and an independent column lands after a zero diagonal entry,
    where the rank cut would drop it. Such an order is detected on R's diagonal and redone by Householder."""
    LU, pivots, _ = torch.linalg.lu_factor_ex(W.mT)
    P = torch.lu_unpack(LU, pivots, unpack_data=False)[0]
    piv = P.argmax(0)
    R = torch.linalg.qr(W[:, piv], mode="r").R[:min(W.shape)]
    diag = R.diagonal().abs()
    smallest_before = torch.cat((diag.new_full((1,), math.inf), diag.cummin(0).values[:-1]))
    if bool((diag > LU_ORDER_JUMP * smallest_before).any()):  # one host sync
        return _qrcp_torch(W)
    return R, piv


def _qrcp_torch(W: Tensor) -> tuple[Tensor, Tensor]:
    """Householder QR with column pivoting (Businger–Golub). Pivots stay on the device: swaps are gathers."""
    d, n = W.shape
    W = W.clone()
    piv = torch.arange(n, device=W.device)
    for j in range(min(d, n)):
        p = j + (W[j:, j:].square().sum(0)).argmax()
        pair = torch.stack((torch.tensor(j, device=W.device), p))
        W[:, pair] = W[:, pair.flip(0)]
        piv[pair] = piv[pair.flip(0)]
        x = W[j:, j]
        norm = x.norm()
        alpha = torch.where(x[0] >= 0, -norm, norm)  # reflect away from x₀ to avoid cancellation
        v = x.clone()
        v[0] = v[0] - alpha
        v = v / v.norm().clamp_min(torch.finfo(W.dtype).tiny)
        W[j:, j:] -= 2.0 * torch.outer(v, v @ W[j:, j:])
    return W[:min(d, n)].triu(), piv


DROPPED_COLUMNS_FACTOR = 10.0
"""Step 7's bound is DROPPED_COLUMNS_FACTOR · √(n−k) · τ · max|R[j, j]|. Why: geqp3 leaves each dropped column
of the sketch with norm <= τ max|R_sk[j, j]|, so ‖R_sk[k:, k:]‖_F <= √(n−k) τ max; the sketch distorts norms by
at most (1 − √(n/d))⁻¹ ≈ 9.5 at γ = 1.25 (Gaussian S). Measured on the test suite's rank-deficient matrices
(rank 20 of 50, repeated columns, float32 at cond 1e12; 40 seeds each, float32 and float64, every sketch, both
pivoting modes, "auto" and "lu" pivots) the residual reached at most 2.98 √(n−k) τ max|R[j, j]|; a sketch that
lost rank leaves O(‖A‖) (eye(8): 5e14 times the bound)."""


def _check(A: Tensor, gamma: float, sketch: str, qrcp_backend: str, rank_tol: float | None) -> None:
    if not isinstance(A, Tensor) or A.dim() != 2:
        raise ValueError(f"cqrrpt: A must be a 2-D tensor, got shape {tuple(getattr(A, 'shape', ()))}")
    if A.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"cqrrpt: A must be float32 or float64, got {A.dtype}")
    m, n = A.shape
    if n < 1 or m < n:
        # A QR of A.mT would pivot A's rows, not its columns: no cheap reduction gives A[:, piv] = Q R.
        raise ValueError(f"cqrrpt: A must be tall (m >= n >= 1), got shape {(m, n)}; wide A is not supported "
                         "(for a column-pivoted QR of a wide A use scipy.linalg.qr(A, pivoting=True))")
    if not (isinstance(gamma, (int, float)) and math.isfinite(gamma) and gamma >= 1.0):
        raise ValueError(f"cqrrpt: gamma (sketch rows per column) must be a finite number >= 1, got {gamma}")
    if rank_tol is not None and not (isinstance(rank_tol, (int, float)) and 0.0 < rank_tol < 1.0):
        raise ValueError(f"cqrrpt: rank_tol must lie in (0, 1), got {rank_tol} (it is relative to max|R[j, j]|)")
    if sketch not in SKETCHES:
        raise ValueError(f"cqrrpt: unknown sketch {sketch!r}; expected one of {sorted(SKETCHES)}")
    if qrcp_backend not in QRCP_BACKENDS:
        raise ValueError(f"cqrrpt: qrcp_backend must be one of {QRCP_BACKENDS}, got {qrcp_backend!r}")


@torch.no_grad()
def cqrrpt(A: Tensor, *, gamma: float = 1.25, sketch: str = "sparse_sign",
           generator: torch.Generator | int | None = None, rank_tol: float | None = None,
           qrcp_backend: str = "auto", refine: bool = False, pivoting: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """Pivoted QR of a tall A (m, n) -> (Q (m, k), R (k, n), piv (n,)) with A[:, piv] ≈ Q @ R.

    k is A's numerical rank at the relative threshold :func:`rank_threshold` (``rank_tol`` overrides it): found
    on the sketch, confirmed on R, and, when k < n, checked on A (step 7 of the module docstring), which redoes
    the factorization with A as its own sketch if the sketch lost rank. Q and R have A's dtype and device; piv
    is int64. ``sketch`` names the operator S, ``gamma`` sets its d = ⌈γ n⌉ rows (no sketch when d >= m).

    ‖QᵀQ − I‖ is O(eps · cond(A_pre)²), and cond(A_pre) is the sketch's distortion, about
    (1 + √(n/d)) / (1 − √(n/d)): ~18 at γ = 1.25, ~6 at γ = 2. ``refine=True`` adds one more Cholesky QR
    pass on Q (CholeskyQR2: a Gram and a GEMM, 2 m k² flops each), bringing it to O(eps).

    ``pivoting=False`` is a fast path for matrices expected to have full column rank: the sketch gets an
    unpivoted Householder QR on A's device (no host round trip for LAPACK's geqp3) and piv = arange(n). If
    the sketch's R or the Cholesky factorization shows rank deficiency, it redoes the pivoted algorithm.

    ``qrcp_backend`` picks the small pivoted QR (:func:`qrcp`). ``generator``: a ``torch.Generator``, used on
    its own device, or a seed for a new generator on A's device, so a seed's sketch is drawn where A lives
    (a GPU and the CPU draw different sketches from one seed, as ``torch.randn`` does).
    """
    _check(A, gamma, sketch, qrcp_backend, rank_tol)
    m, n = A.shape
    d = math.ceil(gamma * n)
    if d >= m:
        A_sk = A
    else:
        S = make_sketch(sketch, d, m, generator=as_generator(generator, A.device), dtype=A.dtype, device=A.device)
        A_sk = S.apply(A, dim=0)
    # Every entry of A reaches some entry of S A with a nonzero weight, so a NaN/Inf in A shows in the small
    # sketch: checking it there saves a full pass over A.
    if not torch.isfinite(A_sk).all():
        raise ValueError("cqrrpt: A contains NaN or Inf (or overflows when sketched)")
    tau = rank_threshold(A.dtype) if rank_tol is None else rank_tol
    result = _factor(A, A_sk, tau, qrcp_backend, refine, pivoting)
    if A_sk is not A and not _dropped_columns_represented(A, result, tau):
        result = _factor(A, A, tau, qrcp_backend, refine, pivoting)  # the sketch lost rank: A is exact
    if result is None:
        raise ValueError("cqrrpt: A is numerically zero (rank 0)")
    return result


def _factor(A: Tensor, A_sk: Tensor, tau: float, qrcp_backend: str, refine: bool,
            pivoting: bool) -> tuple[Tensor, Tensor, Tensor] | None:
    """Steps 2-6 of the module docstring on the sketch A_sk; None when A_sk has numerical rank 0."""
    n = A.shape[1]
    if not pivoting:
        R_sk = torch.linalg.qr(A_sk.double(), mode="r").R
        diag = R_sk.diagonal().abs()
        if bool((diag >= tau * diag.max()).all()):
            # No gather (the columns stay in order); the copy is the buffer the preconditioning overwrites.
            L, A_pre, k = _preconditioned_cholesky(A.clone(memory_format=torch.contiguous_format), R_sk)
            if k == n:
                Q, R, piv = _finish(A_pre, L, R_sk, torch.arange(n, device=A.device), refine, tau)
                if Q.shape[1] == n:
                    return Q, R, piv
    R_sk, piv = qrcp(A_sk, backend=qrcp_backend)
    diag = R_sk.diagonal().abs()
    k = int(((diag >= tau * diag.max()) & (diag > 0)).cumprod(0).sum())  # one host sync
    if k == 0:
        return None
    # index_select copies whole rows at a time: about twice as fast as advanced indexing A[:, idx] on the CPU.
    L, A_pre, k = _preconditioned_cholesky(A.index_select(1, piv[:k]), R_sk)
    return _finish(A_pre, L, R_sk, piv, refine, tau)


_CHECK_ELEMENTS = 1 << 23


def _dropped_columns_represented(A: Tensor, result: tuple[Tensor, Tensor, Tensor] | None, tau: float) -> bool:
    """Step 7: whether Q R[:, k:] reproduces the columns A[:, piv[k:]] that the rank k left out (trivially so
    when k = n, so the full-rank fast path pays nothing). Evaluated in float64, so the GEMM's own rounding
    does not count against the bound (:data:`DROPPED_COLUMNS_FACTOR`)."""
    if result is None:  # the sketch saw rank 0: A may still be nonzero
        return False
    Q, R, piv = result
    k, n = R.shape
    if k == n:
        return True
    Q64, squares = Q.double(), torch.zeros((), dtype=torch.float64, device=A.device)
    step = max(1, _CHECK_ELEMENTS // A.shape[0])  # float64 copies of at most ~64 MB: n - k may be most of n
    for j in range(k, n, step):
        cols = piv[j:j + step]
        squares += (A.index_select(1, cols).double() - Q64 @ R[:, j:j + step].double()).square().sum()
    bound = DROPPED_COLUMNS_FACTOR * math.sqrt(n - k) * tau * R.diagonal().abs().max().double()
    return bool(squares.sqrt() <= bound)


def _preconditioned_cholesky(A_k: Tensor, R_sk: Tensor) -> tuple[Tensor, Tensor, int]:
    """A_pre = A_k R_sk[:k, :k]⁻¹ for the k selected columns A_k (a row-major copy that is overwritten with
    A_pre), and the Cholesky factor L of A_preᵀ A_pre (float64), truncated to the leading columns that
    Cholesky accepts."""
    k = A_k.shape[1]
    R11 = R_sk[:k, :k].to(A_k.dtype)
    # The same substitution as solve_triangular(R11, A_k, left=False), posed on the transposes: A_kᵀ of a
    # row-major A_k is column-major, as LAPACK's trsm wants, so it is solved in place (no copy of A_k, a
    # row-major A_pre for the GEMMs after it; the right-sided form transposes A_k into a new buffer).
    A_pre = torch.linalg.solve_triangular(R11.mT, A_k.mT, upper=False, out=A_k.mT).mT
    L, info = torch.linalg.cholesky_ex((A_pre.mT @ A_pre).double())
    failed = int(info)
    if failed > 0:  # the leading failed-1 columns are numerically independent; drop the rest
        k = failed - 1
        if k == 0:
            raise ValueError("cqrrpt: the preconditioned Gram matrix is not positive definite (rank 0)")
        L, A_pre = L[:k, :k], A_pre[:, :k]
    return L, A_pre, k


def _finish(A_pre: Tensor, L: Tensor, R_sk: Tensor, piv: Tensor, refine: bool,
            tau: float) -> tuple[Tensor, Tensor, Tensor]:
    """Q = A_pre R_c⁻¹ and R = R_c R_sk[:k] with R_c = Lᵀ, the rank confirmed on R (:func:`_confirmed_rank`),
    optionally one more Cholesky QR pass."""
    k = L.shape[0]
    Rc = L.mT
    Q = A_pre @ torch.linalg.inv(Rc).to(A_pre.dtype)  # Rc is well conditioned: a GEMM is as accurate as a solve
    R = Rc @ R_sk[:k]
    rank = _confirmed_rank(R, tau)
    if rank < k:
        Q, R = Q[:, :rank].contiguous(), R[:rank]
    if refine:
        Rc2 = torch.linalg.cholesky((Q.mT @ Q).double()).mT
        Q = Q @ torch.linalg.inv(Rc2).to(A_pre.dtype)
        R = Rc2 @ R
    return Q, R.to(A_pre.dtype), piv


def _confirmed_rank(R: Tensor, tau: float) -> int:
    """The number of leading rows of R (k, n) to keep: the smallest i with ‖R[i:, :]‖_F <= τ max|R[j, j]|.

    The sketch's R decides the rank first, but a float32 sketch carries its own rounding (S A sums thousands
    of terms per entry), which can lift a noise column's |R_sk[i, i]| over τ; R = R_c R_sk[:k] is the
    triangular factor of A itself, and since A[:, piv] = Q R with Q orthonormal, dropping rows i: of R
    changes A's reconstruction by exactly ‖R[i:, :]‖_F, so the cut never discards more than τ‖A‖.
    """
    tail = R.square().sum(1).flip(0).cumsum(0).flip(0).sqrt()  # tail[i] = ‖R[i:, :]‖_F
    return int((tail > tau * R.diagonal().abs().max()).sum())
