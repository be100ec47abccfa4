"""cqrrpt: A[:, piv] = Q R with ‖AP − QR‖/‖A‖ and ‖QᵀQ − I‖ at working precision in float32 and float64,
ill-conditioned and rank-deficient inputs, full rank kept in float32 (the prior art truncated it), qrcp, errors."""

import importlib
import math

import pytest
import torch

from panther_fx.linalg import SKETCHES, cqrrpt, qrcp, rank_threshold

F64 = torch.float64
M, N = 1000, 50
# "auto" is geqp3 (SciPy) on the CPU; "lu" is what "auto" picks on a GPU, run here on the CPU.
BACKENDS = pytest.mark.parametrize("backend", ["auto", "lu"])


def with_cond(m, n, cond, dtype, seed=0, rank=None):
    """U diag(s) Vᵀ with singular values log-spaced from 1 to 1/cond (rank of them), built in float64."""
    g = torch.Generator().manual_seed(seed)
    rank = rank or n
    U = torch.linalg.qr(torch.randn(m, rank, dtype=F64, generator=g)).Q
    V = torch.linalg.qr(torch.randn(n, rank, dtype=F64, generator=g)).Q
    s = torch.logspace(0, -math.log10(cond), rank, dtype=F64)
    return ((U * s) @ V.t()).to(dtype)


def errors(A, Q, R, piv):
    """(‖A[:, piv] − QR‖_F/‖A‖_F, ‖QᵀQ − I‖_F) in units of the dtype's eps, evaluated in float64."""
    eps = torch.finfo(A.dtype).eps
    A, Q, R = A.double(), Q.double(), R.double()
    rec = torch.linalg.norm(A[:, piv] - Q @ R) / torch.linalg.norm(A)
    orth = torch.linalg.norm(Q.t() @ Q - torch.eye(Q.shape[1], dtype=F64))
    return rec.item() / eps, orth.item() / eps


def assert_factorization(A, Q, R, piv, rank, rec_eps=10, orth_eps=5 * N):
    assert Q.shape == (A.shape[0], rank) and R.shape == (rank, A.shape[1])
    assert Q.dtype == R.dtype == A.dtype and piv.dtype == torch.int64
    assert torch.equal(piv.sort().values, torch.arange(A.shape[1]))
    assert torch.equal(R, R.triu())
    rec, orth = errors(A, Q, R, piv)
    assert rec <= rec_eps and orth <= orth_eps, (rec, orth)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("cond", [10.0, 1e6])
@BACKENDS
def test_full_rank_at_working_precision(dtype, cond, backend):
    A = with_cond(M, N, cond, dtype)
    Q, R, piv = cqrrpt(A, generator=0, qrcp_backend=backend)
    assert_factorization(A, Q, R, piv, rank=N)


@BACKENDS
def test_float64_cond_1e12_full_rank(backend):
    A = with_cond(M, N, 1e12, F64, seed=1)
    Q, R, piv = cqrrpt(A, generator=1, qrcp_backend=backend)
    assert_factorization(A, Q, R, piv, rank=N)


@BACKENDS
def test_float32_cond_1e12_truncates_to_numerical_rank(backend):
    """Singular values below τ = 2 eps^0.95 (5.3e-7) are noise in float32: about 26 of 50 survive."""
    A = with_cond(M, N, 1e12, torch.float32, seed=2)
    Q, R, piv = cqrrpt(A, generator=2, qrcp_backend=backend)
    above = int((torch.logspace(0, -12, N, dtype=F64) > rank_threshold(torch.float32)).sum())
    assert above <= Q.shape[1] <= above + 4
    assert_factorization(A, Q, R, piv, rank=Q.shape[1], rec_eps=20)


@BACKENDS
def test_float32_full_rank_is_kept_with_uneven_column_scales(backend):
    """The prior art's absolute rank threshold truncated full-rank float32 matrices; ours is relative."""
    g = torch.Generator().manual_seed(3)
    A = torch.randn(M, N, generator=g) * torch.logspace(2, -2, N)  # column norms over 4 orders
    Q, R, piv = cqrrpt(A, generator=3, qrcp_backend=backend)
    assert_factorization(A, Q, R, piv, rank=N)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@BACKENDS
def test_rank_deficient_gets_exact_rank(dtype, backend):
    A = with_cond(M, N, 10.0, dtype, rank=20, seed=4)
    Q, R, piv = cqrrpt(A, generator=4, qrcp_backend=backend)
    assert_factorization(A, Q, R, piv, rank=20)


@BACKENDS
def test_repeated_columns(backend):
    g = torch.Generator().manual_seed(5)
    B = torch.randn(M, 10, dtype=F64, generator=g)
    A = torch.cat([B, B[:, :5] * 2.0, B[:, 3:8] - B[:, :5]], dim=1)  # rank 10, 20 columns
    Q, R, piv = cqrrpt(A, generator=5, qrcp_backend=backend)
    assert_factorization(A, Q, R, piv, rank=10)


@pytest.mark.parametrize("sketch", sorted(SKETCHES))
def test_every_sketch(sketch):
    A = with_cond(M, N, 1e4, torch.float32, seed=6)
    Q, R, piv = cqrrpt(A, sketch=sketch, generator=6)
    assert_factorization(A, Q, R, piv, rank=N)


def test_unpreconditioned_cholesky_qr_would_fail():
    """Why the preconditioner matters: plain Cholesky QR on cond 1e6 loses orthogonality entirely."""
    A = with_cond(M, N, 1e6, F64, seed=7)
    R = torch.linalg.cholesky(A.t() @ A).t()
    Q = torch.linalg.solve_triangular(R, A, upper=True, left=False)
    assert errors(A, Q, R, torch.arange(N))[1] > 1e4 * N
    assert errors(A, *cqrrpt(A, generator=7))[1] <= 5 * N


@BACKENDS
def test_rank_threshold_is_relative_and_dtype_aware(backend):
    assert rank_threshold(torch.float32) == pytest.approx(2 * torch.finfo(torch.float32).eps ** 0.95)
    assert rank_threshold(torch.float64) < 1e-14 < 1e-7 < rank_threshold(torch.float32) < 1e-6
    A = with_cond(M, N, 1e3, torch.float32, seed=8) * 1e-6  # scale does not change the rank
    assert cqrrpt(A, generator=8, qrcp_backend=backend)[0].shape[1] == N


@pytest.mark.parametrize("backend", ["torch", "scipy", "lu"])
def test_qrcp_backends(backend):
    if backend == "scipy":
        pytest.importorskip("scipy")
    g = torch.Generator().manual_seed(9)
    W = torch.randn(30, 20, dtype=F64, generator=g) * torch.logspace(0, -3, 20, dtype=F64)
    R, piv = qrcp(W, backend=backend)
    assert R.shape == (20, 20) and torch.equal(piv.sort().values, torch.arange(20))
    torch.testing.assert_close(R.t() @ R, W[:, piv].t() @ W[:, piv], rtol=0, atol=1e-12)
    d = R.diagonal().abs()
    if backend != "lu":  # LU's pivots follow one row of the eliminated W at a time, not the column norms
        assert (d[1:] <= d[:-1] * (1 + 1e-12)).all()  # column pivoting orders the diagonal


def test_qrcp_lu_puts_independent_columns_first():
    g = torch.Generator().manual_seed(15)
    B = torch.randn(40, 6, dtype=F64, generator=g)
    W = torch.cat([B[:, :3] + B[:, 3:], B, B[:, :2] * 3.0], dim=1)  # rank 6, 11 columns
    R, piv = qrcp(W, backend="lu")
    assert torch.linalg.matrix_rank(W[:, piv[:6]]) == 6
    d = R.diagonal().abs()
    assert (d[:6] > 1e-3 * d.max()).all() and (d[6:] < 1e-12 * d.max()).all()


def test_lu_pivots_that_bury_an_independent_column_are_redone():
    """LU's partial pivoting picks a column by one coordinate: where every remaining column is zero there, it
    takes the next one, dependent or not. diag(1, 0, 1) then had R diagonal [1, 0, 1], rank 1 and
    ‖A[:, piv] − QR‖ = 1 (the default backend on a GPU); e0, e0, e500 through a CountSketch likewise."""
    assert_factorization(torch.diag(torch.tensor([1.0, 0.0, 1.0], dtype=F64)),
                         *cqrrpt(torch.diag(torch.tensor([1.0, 0.0, 1.0], dtype=F64)), qrcp_backend="lu"), rank=2)
    A = torch.zeros(1000, 3, dtype=F64)
    A[0, 0] = A[0, 1] = A[500, 2] = 1.0
    for sketch in ("countsketch", "sparse_sign"):
        assert_factorization(A, *cqrrpt(A, sketch=sketch, generator=0, qrcp_backend="lu"), rank=2)


@pytest.mark.parametrize("seed", [10, 21])
def test_float32_rank_is_confirmed_on_A_not_on_its_sketch(seed):
    """A float32 sketch sums many rounded terms per entry, which can lift a noise column of the sketch's R over
    τ (these seeds gave rank 21 with LU pivots); the rank is confirmed on R = R_c R_sk, the factor of A."""
    A = with_cond(M, N, 10.0, torch.float32, rank=20, seed=seed)
    Q, R, piv = cqrrpt(A, generator=seed, qrcp_backend="lu")
    assert_factorization(A, Q, R, piv, rank=20)


def test_qrcp_torch_matches_scipy():
    pytest.importorskip("scipy")
    W = torch.randn(40, 25, dtype=F64, generator=torch.Generator().manual_seed(10))
    (R1, p1), (R2, p2) = qrcp(W, backend="torch"), qrcp(W, backend="scipy")
    assert torch.equal(p1, p2)
    torch.testing.assert_close(R1.diagonal().abs(), R2.diagonal().abs(), rtol=1e-12, atol=0)


def test_reproducible_by_seed():
    A = with_cond(M, N, 1e3, F64, seed=11)
    a, b = cqrrpt(A, generator=12), cqrrpt(A, generator=12)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("A, kwargs, match", [
    (torch.randn(10), {}, "2-D"),
    (torch.randn(5, 10), {}, r"tall \(m >= n >= 1\), got shape \(5, 10\)"),
    (torch.ones(10, 3, dtype=torch.int64), {}, "float32 or float64"),
    (torch.full((10, 3), float("inf")), {}, "NaN or Inf"),
    (torch.randn(200, 3).index_put_((torch.tensor(150), torch.tensor(2)), torch.tensor(float("nan"))), {}, "NaN or Inf"),
    (torch.randn(200, 3).index_put_((torch.tensor(7), torch.tensor(0)), torch.tensor(float("-inf"))),
     {"sketch": "countsketch"}, "NaN or Inf"),
    (torch.randn(200, 3).index_put_((torch.tensor(99), torch.tensor(1)), torch.tensor(float("inf"))),
     {"sketch": "srht"}, "NaN or Inf"),
    (torch.randn(10, 3), {"gamma": 0.5}, "gamma"),
    (torch.randn(10, 3), {"sketch": "dense"}, "unknown sketch 'dense'"),
    (torch.randn(10, 3), {"qrcp_backend": "magma"}, "qrcp_backend must be one of"),
    (torch.zeros(10, 3), {}, "numerically zero"),
])
def test_bad_input_errors(A, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cqrrpt(A, **kwargs)


def test_qrcp_backend_name_checked():
    with pytest.raises(ValueError, match="backend"):
        qrcp(torch.randn(4, 3), backend="lapack")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda(dtype):
    A = with_cond(M, N, 1e6, dtype, seed=13).cuda()
    cpu_generator = torch.Generator().manual_seed(13)  # drawn on the CPU, then moved
    for kwargs in ({"qrcp_backend": "auto"}, {"qrcp_backend": "torch"}, {"qrcp_backend": "scipy"},
                   {"pivoting": False}, {"generator": cpu_generator}):
        Q, R, piv = cqrrpt(A, **{"generator": 13, **kwargs})
        assert Q.is_cuda and R.is_cuda and piv.is_cuda
        assert_factorization(A.cpu(), Q.cpu(), R.cpu(), piv.cpu(), rank=N)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_refine_brings_orthogonality_to_eps(dtype):
    A = with_cond(M, N, 1e6, dtype, seed=14)
    plain = errors(A, *cqrrpt(A, generator=14))[1]
    Q, R, piv = cqrrpt(A, generator=14, refine=True)
    assert_factorization(A, Q, R, piv, rank=N, orth_eps=N / 2)
    assert errors(A, Q, R, piv)[1] < plain / 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_unpivoted_fast_path_on_full_rank(dtype):
    A = with_cond(M, N, 1e4, dtype, seed=15)
    Q, R, piv = cqrrpt(A, generator=15, pivoting=False)
    assert torch.equal(piv, torch.arange(N))
    assert_factorization(A, Q, R, piv, rank=N)


def test_unpivoted_falls_back_to_pivoting_on_rank_deficiency():
    A = with_cond(M, N, 10.0, F64, rank=20, seed=16)
    Q, R, piv = cqrrpt(A, generator=16, pivoting=False)
    assert not torch.equal(piv, torch.arange(N))  # the pivoted algorithm ran
    assert_factorization(A, Q, R, piv, rank=20)


@pytest.mark.parametrize("pivoting", [True, False])
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_input_is_left_untouched(pivoting, layout):
    """The preconditioning solve overwrites its buffer in place: it must be a copy, never A itself."""
    A = with_cond(M, N, 1e3, F64, seed=17)
    if layout == "transposed":
        A = A.t().contiguous().t()
    before = A.clone()
    Q, R, piv = cqrrpt(A, generator=17, pivoting=pivoting)
    assert torch.equal(A, before)
    assert_factorization(A, Q, R, piv, rank=N)


def orthonormal(m, n, seed, dtype=F64):
    return torch.linalg.qr(torch.randn(m, n, dtype=F64, generator=torch.Generator().manual_seed(seed))).Q.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("seed", range(4))
def test_square_input_keeps_full_rank(dtype, seed):
    """⌈γn⌉ >= m gives no size reduction and a square S that may be singular (eye(8) with seed 0 got rank 7,
    error 0.5): such A is its own sketch."""
    for A in (torch.eye(8, dtype=dtype), orthonormal(100, 100, seed, dtype), orthonormal(110, 100, seed, dtype)):
        for sketch in sorted(SKETCHES):
            Q, R, piv = cqrrpt(A, sketch=sketch, generator=seed)
            assert_factorization(A, Q, R, piv, rank=A.shape[1])


def test_square_rank_deficient_gets_exact_rank():
    A = with_cond(60, 50, 10.0, F64, rank=20, seed=18)
    for pivoting in (True, False):
        Q, R, piv = cqrrpt(A, generator=18, pivoting=pivoting)
        assert_factorization(A, Q, R, piv, rank=20)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("pivoting", [True, False])
def test_rank_lost_by_the_sketch_is_recovered(dtype, pivoting):
    """CountSketch of a 200 x 100 orthonormal A with d = 125 rows has rank 99 (seed 0): the dropped column is
    not represented by Q (error 0.52), so cqrrpt redoes the factorization on A itself."""
    A = orthonormal(200, 100, 0, dtype)
    Q, R, piv = cqrrpt(A, sketch="countsketch", generator=0, pivoting=pivoting)
    assert_factorization(A, Q, R, piv, rank=100)


@pytest.mark.parametrize("check_elements", [1 << 23, 300 * 3])
def test_dropped_column_check_in_chunks(check_elements, monkeypatch):
    """Step 7 on a rank-20 300 x 50 A, in one pass or in column chunks of 3 (the bounded-memory path for large
    A): it accepts the factorization and rejects one whose R misrepresents a single dropped column."""
    cqrrpt_module = importlib.import_module("panther_fx.linalg.cqrrpt")  # the package's `cqrrpt` is the function

    monkeypatch.setattr(cqrrpt_module, "_CHECK_ELEMENTS", check_elements)
    A = with_cond(300, 50, 10.0, F64, rank=20, seed=19)
    Q, R, piv = cqrrpt(A, generator=19)
    assert R.shape[0] == 20
    tau = rank_threshold(F64)
    assert cqrrpt_module._dropped_columns_represented(A, (Q, R, piv), tau)
    wrong = R.clone()
    wrong[0, 47] += 1e-6 * R.diagonal().abs().max()
    assert not cqrrpt_module._dropped_columns_represented(A, (Q, wrong, piv), tau)


@pytest.mark.parametrize("kwargs, match", [
    ({"rank_tol": 2.0}, r"cqrrpt: rank_tol must lie in \(0, 1\), got 2.0"),
    ({"rank_tol": 0.0}, r"rank_tol must lie in \(0, 1\), got 0.0"),
    ({"rank_tol": float("nan")}, r"rank_tol must lie in \(0, 1\), got nan"),
    ({"gamma": float("inf")}, "cqrrpt: gamma .* must be a finite number >= 1, got inf"),
    ({"gamma": float("nan")}, "gamma .* got nan"),
])
def test_bad_parameters_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        cqrrpt(torch.randn(200, 10, dtype=F64), **kwargs)


def test_wide_input_error_gives_no_wrong_advice():
    with pytest.raises(ValueError, match=r"cqrrpt: A must be tall .* got shape \(10, 20\)") as info:
        cqrrpt(torch.randn(10, 20))
    assert "A.mT" not in str(info.value)
