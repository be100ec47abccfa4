"""sketched_lstsq: residual within 1e-6 relative of torch.linalg.lstsq on well- and ill-conditioned tall
problems (cond 1e6, 1e10), several right-hand sides, float32 input, sketch-and-solve, errors."""

import math

import pytest
import torch

from panther_fx.linalg import SKETCHES, sketched_lstsq

F64 = torch.float64
M, N = 1500, 40


def problem(cond, seed=0, k=None, noise=1e-3):
    """A (M, N) with log-spaced singular values 1..1/cond and b = A x + noise (inconsistent)."""
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(M, N, dtype=F64, generator=g)).Q
    V = torch.linalg.qr(torch.randn(N, N, dtype=F64, generator=g)).Q
    A = (U * torch.logspace(0, -math.log10(cond), N, dtype=F64)) @ V.t()
    shape = (M,) if k is None else (M, k)
    x = torch.randn(N, *shape[1:], dtype=F64, generator=g)
    return A, A @ x + noise * torch.randn(shape, dtype=F64, generator=g)


def residual(A, x, b):
    return torch.linalg.norm(A.double() @ x.double() - b.double(), dim=0)


def reference(A, b):
    B = b[:, None] if b.dim() == 1 else b
    x = torch.linalg.lstsq(A.double(), B.double(), driver="gelsd").solution
    return x[:, 0] if b.dim() == 1 else x


@pytest.mark.parametrize("cond", [1.0, 1e6, 1e10])
@pytest.mark.parametrize("sketch", sorted(SKETCHES))
def test_residual_matches_lstsq(cond, sketch):
    A, b = problem(cond)
    x = sketched_lstsq(A, b, sketch=sketch, generator=0)
    assert x.shape == (N,) and x.dtype == F64
    assert residual(A, x, b) <= (1 + 1e-6) * residual(A, reference(A, b), b)


def test_well_conditioned_solution_matches():
    """The forward error follows tol: ~cond(A)·tol relative, so tol=1e-14 gives x to ~1e-12."""
    A, b = problem(10.0, seed=1)
    torch.testing.assert_close(sketched_lstsq(A, b, generator=1, tol=1e-14), reference(A, b), rtol=1e-10, atol=1e-12)
    loose = sketched_lstsq(A, b, generator=1, tol=1e-6)
    assert 1e-12 < (loose - reference(A, b)).norm() / reference(A, b).norm() < 1e-4


def test_consistent_system_is_solved_exactly():
    A, _ = problem(1e3, seed=2)
    x = torch.randn(N, dtype=F64, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(sketched_lstsq(A, A @ x, generator=2), x, rtol=0, atol=1e-9)


def test_several_right_hand_sides():
    A, B = problem(1e6, seed=3, k=3)
    B[:, 1] *= 1e4  # columns of very different scales converge together
    X = sketched_lstsq(A, B, generator=3)
    assert X.shape == (N, 3)
    assert (residual(A, X, B) <= (1 + 1e-6) * residual(A, reference(A, B), B)).all()


def test_float32_input_solved_in_float64():
    A, b = problem(1e4, seed=4)
    A32, b32 = A.float(), b.float()
    x = sketched_lstsq(A32, b32, generator=4)
    assert x.dtype == torch.float32
    # the float64 solve of the float32 data, rounded to float32 at the end
    best = residual(A32, reference(A32, b32), b32)
    assert residual(A32, x, b32) <= (1 + 1e-6) * best
    assert residual(A32, x, b32) < residual(A32, torch.linalg.lstsq(A32, b32[:, None]).solution[:, 0], b32)


def test_sketch_and_solve_is_close_but_not_optimal():
    A, b = problem(100.0, seed=5, noise=1.0)
    best = residual(A, reference(A, b), b)
    r = residual(A, sketched_lstsq(A, b, method="sketch", generator=5), b)
    assert best * (1 + 1e-6) < r < 1.5 * best


def test_preconditioned_beats_few_iterations():
    """The stopping rule is live: one LSQR iteration is not enough on cond 1e10."""
    A, b = problem(1e10, seed=6)
    best = residual(A, reference(A, b), b)
    with pytest.warns(RuntimeWarning, match="LSQR did not reach tol = 1e-10 in max_iter = 1") as caught:
        assert residual(A, sketched_lstsq(A, b, generator=6, max_iter=1), b) > (1 + 1e-6) * best
    assert caught[0].filename == __file__
    assert residual(A, sketched_lstsq(A, b, generator=6), b) <= (1 + 1e-6) * best


def test_a_sketch_that_misses_a_direction_of_a_is_not_used():
    """A perfectly conditioned but coherent A = [I; 1e-12 noise]: a CountSketch of d = 4n rows merges two
    identity rows, its R is nearly singular without looking so, and LSQR's stopping tests then passed on a
    solution with 770 times the optimal residual. A R⁻¹ far from an isometry now sends it to A's own QR."""
    g = torch.Generator().manual_seed(0)
    A = torch.cat([torch.eye(50, dtype=torch.float64), 1e-12 * torch.randn(3950, 50, generator=g,
                                                                             dtype=torch.float64)])
    b = torch.randn(4000, generator=g, dtype=torch.float64)
    best = residual(A, reference(A, b), b)
    for seed in range(3):
        assert residual(A, sketched_lstsq(A, b, sketch="countsketch", generator=seed), b) <= (1 + 1e-6) * best


@pytest.mark.parametrize("A, b, kwargs, match", [
    (torch.randn(5, 10), torch.randn(5), {}, r"tall \(m >= n >= 1\)"),
    (torch.randn(20, 3), torch.randn(19), {}, r"b must be \(20,\) or \(20, k\)"),
    (torch.randn(20, 3), torch.randn(20, 2, 2), {}, "b must be"),
    (torch.randn(20, 3), torch.full((20,), float("nan")), {}, "b contains NaN or Inf"),
    (torch.ones(20, 3, dtype=torch.int64), torch.randn(20), {}, "A must be float32 or float64"),
    (torch.randn(20, 3), torch.randn(20), {"method": "qr"}, "unknown method 'qr'"),
    (torch.randn(20, 3), torch.randn(20), {"sketch": "x"}, "unknown sketch 'x'"),
    (torch.randn(20, 3), torch.randn(20), {"sketch_size": 2}, r"sketch_size must lie in \[n, m\] = \[3, 20\]"),
    (torch.randn(20, 3)[:, [0, 1, 1]], torch.randn(20), {}, "rank deficient"),
    (torch.randn(20, 3), torch.empty(20, device="meta"), {}, "b is on meta but A is on cpu"),
])
def test_bad_input_errors(A, b, kwargs, match):
    with pytest.raises(ValueError, match=match):
        sketched_lstsq(A, b, **kwargs)


@pytest.mark.cuda
def test_cuda():
    A, b = problem(1e6, seed=7)
    x = sketched_lstsq(A.cuda(), b.cuda(), generator=7)
    assert x.is_cuda
    assert residual(A, x.cpu(), b) <= (1 + 1e-6) * residual(A, reference(A, b), b)


@pytest.mark.parametrize("seed", [302, 1186, 1478])
def test_exactly_repeated_column_is_rank_deficient(seed):
    """Householder rounding leaves the repeated column's |R[i, i]| at a few d·eps: with a threshold of n·eps,
    these seeds (10 of 3000) slipped through and got a solution for a rank-deficient A."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(20, 3, generator=g)[:, [0, 1, 1]]
    with pytest.raises(ValueError, match="rank deficient"):
        sketched_lstsq(A, torch.randn(20, generator=g))


def orthonormal(m, n, seed):
    return torch.linalg.qr(torch.randn(m, n, dtype=F64, generator=torch.Generator().manual_seed(seed))).Q


@pytest.mark.parametrize("seed", range(4))
def test_square_input_is_solved(seed):
    """d = min(m, 4n) = m gives a square S that may be singular (eye(8) was refused as rank deficient for seeds
    0 and 2): A is then its own sketch."""
    g = torch.Generator().manual_seed(seed)
    for A in (torch.eye(8, dtype=F64), orthonormal(100, 100, seed), orthonormal(120, 100, seed)):
        b = torch.randn(A.shape[0], dtype=F64, generator=g)
        best = residual(A, reference(A, b), b)  # 0 for square A: allow rounding
        for sketch in sorted(SKETCHES):
            x = sketched_lstsq(A, b, sketch=sketch, generator=seed)
            assert residual(A, x, b) <= (1 + 1e-6) * best + 1e-12


@pytest.mark.parametrize("method", ["precondition", "sketch"])
def test_rank_lost_by_the_sketch_is_not_blamed_on_A(method):
    """This CountSketch (d = 125) of a 200 x 100 orthonormal A has rank 99: A's own QR decides instead."""
    A = orthonormal(200, 100, 0)
    b = torch.randn(200, dtype=F64, generator=torch.Generator().manual_seed(0))
    x = sketched_lstsq(A, b, sketch="countsketch", sketch_size=125, generator=0, method=method)
    assert residual(A, x, b) <= (1 + 1e-6) * residual(A, reference(A, b), b)


@pytest.mark.parametrize("kwargs, match", [
    ({"max_iter": 0}, "sketched_lstsq: max_iter must be an int >= 1, got 0"),
    ({"max_iter": -1}, "max_iter must be an int >= 1, got -1"),
    ({"max_iter": 2.5}, "max_iter must be an int >= 1, got 2.5"),
    ({"max_iter": True}, "max_iter must be an int >= 1, got True"),
    ({"tol": -1.0}, "sketched_lstsq: tol must be a finite number > 0, got -1.0"),
    ({"tol": 0.0}, "tol must be a finite number > 0, got 0.0"),
    ({"tol": float("nan")}, "tol must be a finite number > 0, got nan"),
])
def test_bad_parameters_named(kwargs, match):
    A, b = problem(10.0, seed=8)
    with pytest.raises(ValueError, match=match):
        sketched_lstsq(A, b, **kwargs)
