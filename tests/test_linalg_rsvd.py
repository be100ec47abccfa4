"""rsvd: near-optimal error (<= 1.05x the truncated SVD) on fast and slow spectral decay with every sketch,
batches, wide inputs, the tol mode, reproducibility and errors."""

import importlib
import warnings

import pytest
import torch

from panther_fx.linalg import SKETCHES, rsvd

rsvd_module = importlib.import_module("panther_fx.linalg.rsvd")  # the package's rsvd is the function

F64 = torch.float64


@pytest.fixture(autouse=True, params=["householder", "cholesky_qr2"])
def orthonormalization(request, monkeypatch):
    """Every test with both bases: Householder QR (the CPU's) and CholeskyQR2 (CUDA's, forced here)."""
    monkeypatch.setattr(rsvd_module, "_prefer_cholesky_qr", lambda t: request.param == "cholesky_qr2")
    return request.param


def with_spectrum(m: int, n: int, s: torch.Tensor, seed: int = 0, batch: tuple = ()) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(*batch, m, len(s), generator=g, dtype=F64)).Q
    V = torch.linalg.qr(torch.randn(*batch, n, len(s), generator=g, dtype=F64)).Q
    return (U * s) @ V.mT


DECAYS = {
    "fast": 0.7 ** torch.arange(60, dtype=F64),
    "slow": 1.0 / torch.arange(1, 61, dtype=F64),
    "very_slow": torch.arange(1, 61, dtype=F64) ** -0.5,
}


def rel_to_optimal(A, U, S, Vh, s, rank):
    err = torch.linalg.norm(A - (U * S[..., None, :]) @ Vh, dim=(-2, -1))
    return err / s[rank:].norm()


@pytest.mark.parametrize("decay", sorted(DECAYS))
@pytest.mark.parametrize("sketch", sorted(SKETCHES))
def test_error_within_5_percent_of_optimal(decay, sketch):
    s = DECAYS[decay]
    A = with_spectrum(150, 60, s)
    U, S, Vh = rsvd(A, 10, sketch=sketch, generator=1)
    assert U.shape == (150, 10) and S.shape == (10,) and Vh.shape == (10, 60)
    assert rel_to_optimal(A, U, S, Vh, s, 10) <= 1.05
    torch.testing.assert_close(U.mT @ U, torch.eye(10, dtype=F64), rtol=0, atol=1e-12)
    torch.testing.assert_close(S, s[:10], rtol=0.05, atol=0)


def test_float32_and_wide_input():
    s = DECAYS["slow"]
    A = with_spectrum(150, 60, s).mT.contiguous()  # wide (60, 150)
    U, S, Vh = rsvd(A.float(), 10, generator=0, sketch="srht")
    assert U.dtype == torch.float32 and U.shape == (60, 10) and Vh.shape == (10, 150)
    assert rel_to_optimal(A, U.double(), S.double(), Vh.double(), s, 10) <= 1.05


def test_batch_every_matrix_near_optimal():
    s = DECAYS["slow"]
    A = with_spectrum(100, 60, s, batch=(3,))
    A = A * torch.tensor([1.0, 10.0, 0.1], dtype=F64)[:, None, None]
    for sketch in ("gaussian", "sparse_sign"):
        U, S, Vh = rsvd(A, 8, generator=2, sketch=sketch)
        assert U.shape == (3, 100, 8)
        ratios = rel_to_optimal(A, U, S, Vh, s, 8) / torch.tensor([1.0, 10.0, 0.1], dtype=F64)
        assert (ratios <= 1.05).all(), ratios


def test_gaussian_draws_unchanged(orthonormalization):
    """The default path keeps its exact draws: lowrank.svd_factors and the policies depend on them."""
    A = with_spectrum(120, 50, DECAYS["slow"][:50])
    g = torch.Generator().manual_seed(3)
    omega = torch.randn(50, 15, generator=g, dtype=F64)
    Q = torch.linalg.qr(A @ omega).Q
    for _ in range(2):
        Q = torch.linalg.qr(A @ torch.linalg.qr(A.mT @ Q).Q).Q
    Ub, S, Vh = torch.linalg.svd(Q.mT @ A, full_matrices=False)
    U2, S2, Vh2 = rsvd(A, 5, generator=3)
    U = (Q @ Ub)[:, :5]
    if orthonormalization == "cholesky_qr2":  # other bases of the same spans: singular vectors up to sign
        U2 = U2 * (U2 * U).sum(0).sign()
    torch.testing.assert_close(U2, U, rtol=0, atol=1e-13)
    torch.testing.assert_close(S2, S[:5], rtol=0, atol=1e-13)


@pytest.mark.parametrize("sketch", ["gaussian", "sparse_sign"])
def test_reproducible_by_seed(sketch):
    A = with_spectrum(80, 40, DECAYS["slow"][:40])
    a, b = rsvd(A, 5, generator=7, sketch=sketch, n_iter=0), rsvd(A, 5, generator=7, sketch=sketch, n_iter=0)
    c = rsvd(A, 5, generator=8, sketch=sketch, n_iter=0)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0])


@pytest.mark.parametrize("tol", [1e-2, 1e-4, 1e-6])
def test_tol_mode_meets_tol_with_near_minimal_rank(tol):
    s = 0.85 ** torch.arange(120, dtype=F64)
    A = with_spectrum(200, 120, s)
    U, S, Vh = rsvd(A, None, tol=tol, block_size=16, generator=0)
    r = S.shape[0]
    err = torch.linalg.norm(A - (U * S) @ Vh) / torch.linalg.norm(A)
    tails = (s.square().flip(0).cumsum(0).flip(0).sqrt() / s.norm())  # tails[k] = optimal error at rank k
    optimal_rank = int((tails > tol).sum())
    assert err <= tol
    assert optimal_rank <= r <= optimal_rank + 2, (r, optimal_rank)


def test_tol_mode_respects_rank_cap_and_batches():
    s = 0.9 ** torch.arange(60, dtype=F64)
    A = with_spectrum(100, 60, s, batch=(2,))
    A[1] = with_spectrum(100, 60, 0.5 ** torch.arange(60, dtype=F64), seed=1)
    U, S, Vh = rsvd(A, None, tol=1e-3, block_size=8, generator=0)
    err = torch.linalg.norm(A - (U * S[..., None, :]) @ Vh, dim=(-2, -1)) / torch.linalg.norm(A, dim=(-2, -1))
    assert (err <= 1e-3).all() and U.shape[-1] == S.shape[-1] == Vh.shape[-2]
    with pytest.warns(UserWarning, match=r"rsvd: tol=1e-06 not met at the rank cap 12"):
        U, S, Vh = rsvd(A, 12, tol=1e-6, generator=0)  # cap reached before tol
    assert S.shape == (2, 12)


@pytest.mark.parametrize("args, kwargs, match", [
    ((torch.randn(10),), dict(rank=2), "at least 2 dims"),
    ((torch.randn(10, 6),), dict(rank=7), r"rank must lie in \[1, min\(m, n\) = 6\]"),
    ((torch.randn(10, 6),), dict(rank=0), "rank must lie"),
    ((torch.randn(5, 0),), dict(rank=None, tol=0.1), r"A \(5, 0\) is empty"),  # torch.cat([]) raised
    ((torch.randn(10, 6),), dict(rank=None), "give a rank, a tol"),
    ((torch.randn(10, 6),), dict(rank=None, tol=1.5), r"tol .* \(0, 1\)"),
    ((torch.randn(10, 6),), dict(rank=2, sketch="fancy"), "unknown sketch 'fancy'"),
    ((torch.ones(10, 6, dtype=torch.int64),), dict(rank=2), "floating point"),
    ((torch.full((10, 6), float("nan")),), dict(rank=2), "NaN or Inf"),
    ((torch.randn(10, 6),), dict(rank=True), "rsvd: rank must be an int, got True"),
    ((torch.randn(10, 6),), dict(rank=2.5), "rsvd: rank must be an int, got 2.5"),
    ((torch.randn(10, 6),), dict(rank=2, oversample=-5), "rsvd: oversample must be an int >= 0, got -5"),
    ((torch.randn(10, 6),), dict(rank=2, n_iter=-3), "rsvd: n_iter must be an int >= 0, got -3"),
    ((torch.randn(10, 6),), dict(rank=2, n_iter=1.5), "n_iter must be an int >= 0, got 1.5"),
    ((torch.randn(10, 6),), dict(rank=None, tol=0.1, block_size=0), "rsvd: block_size must be an int >= 1, got 0"),
    ((torch.randn(10, 6, dtype=torch.float16),), dict(rank=2), "rsvd: A must be float32 or float64, got torch.float16"),
])
def test_bad_input_errors(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        rsvd(*args, **kwargs)


@pytest.mark.cuda
def test_cuda_matches_quality():
    s = DECAYS["slow"]
    A = with_spectrum(150, 60, s).cuda()
    for sketch in sorted(SKETCHES):
        U, S, Vh = rsvd(A, 10, sketch=sketch, generator=1)
        assert U.is_cuda and rel_to_optimal(A, U, S, Vh, s.cuda(), 10) <= 1.05
    U, S, Vh = rsvd(A, None, tol=1e-2, generator=0)
    assert torch.linalg.norm(A - (U * S) @ Vh) <= 1e-2 * torch.linalg.norm(A)


@pytest.mark.parametrize("cond", [1e2, 1e6])
def test_cholesky_qr2_is_orthonormal_and_exact_at_moderate_condition(cond):
    Y = with_spectrum(500, 40, torch.logspace(0, -torch.log10(torch.tensor(cond)).item(), 40, dtype=F64))
    Q, R = rsvd_module._cholesky_qr2(Y.float())
    assert Q.dtype == torch.float32 and R.dtype == F64
    assert (Q.double().mT @ Q.double() - torch.eye(40, dtype=F64)).abs().max() < 1e-6
    assert torch.linalg.norm(Q.double() @ R - Y) / torch.linalg.norm(Y) < 1e-6
    assert torch.equal(R, R.triu())


def test_cholesky_qr2_declines_a_numerically_rank_deficient_matrix():
    Y = with_spectrum(500, 40, torch.logspace(0, -12, 40, dtype=F64))
    assert rsvd_module._cholesky_qr2(Y) is None


def _decay_08_float32():
    """The review's case: float32 400 x 150 with σᵢ = 0.8ⁱ."""
    s = 0.8 ** torch.arange(1, 151, dtype=F64)
    return with_spectrum(400, 150, s).float(), s


@pytest.mark.parametrize("tol", [3e-4, 1e-4])
def test_float32_tol_mode_returns_near_minimal_rank(tol):
    """The error indicator ‖A‖² − Σ‖Bᵢ‖² carries ~eps‖A‖² of rounding, i.e. √eps relative: below it the loop ran
    to the cap, and the noise added into the final selection returned rank 150 (seed 5) or 52 (seed 4)."""
    A, s = _decay_08_float32()
    tails = s.square().flip(0).cumsum(0).flip(0).sqrt() / s.norm()
    optimal_rank = int((tails > tol).sum())
    for seed in range(6):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # tol is met: no warning
            U, S, Vh = rsvd(A, None, tol=tol, generator=seed)
        r = S.shape[0]
        err = torch.linalg.norm(A.double() - (U.double() * S.double()) @ Vh.double()) / torch.linalg.norm(A.double())
        assert err <= tol and optimal_rank <= r <= optimal_rank + 2, (seed, r, optimal_rank, err)


def test_tol_mode_warns_when_the_cap_stops_it():
    A, _ = _decay_08_float32()
    with pytest.warns(UserWarning, match=r"rsvd: tol=0.001 not met at the rank cap 5 \(relative error 0.3"):
        U, S, Vh = rsvd(A.double(), 5, tol=1e-3, generator=3)
    assert S.shape == (5,)


@pytest.mark.parametrize("wide", [False, True])
def test_tol_warnings_point_at_the_caller(wide):
    A, _ = _decay_08_float32()
    with pytest.warns(UserWarning, match="not met at the rank cap") as record:
        rsvd(A.double().mT if wide else A.double(), 5, tol=1e-3, generator=3)
    assert record[0].filename == __file__


def test_tol_below_float32_resolution_is_reported():
    A, _ = _decay_08_float32()
    with pytest.warns(UserWarning) as record:
        rsvd(A, None, tol=1e-8, generator=0)
    messages = [str(w.message) for w in record]
    assert any(m.startswith("rsvd: tol=1e-08 is below what float32 resolves") for m in messages), messages
    assert any(m.startswith("rsvd: tol=1e-08 not met at the rank cap 150") for m in messages), messages
