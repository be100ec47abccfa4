"""Sketch operators and their kernels (panther::fwht, panther::sparse_sketch(_t)): exactness against dense S,
statistics (E[SᵀS] = I, nonzero structure), reproducibility, errors, opcheck."""

import math

import pytest
import torch

from panther_fx.linalg import SKETCHES, SRHTSketch, SparseSignSketch, make_sketch
from panther_fx.ops import linalg as ops

F64 = torch.float64
KINDS = sorted(SKETCHES)


def hadamard(n: int) -> torch.Tensor:
    H = torch.ones(1, 1, dtype=F64)
    while H.shape[0] < n:
        H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)], 0)
    return H


# ---------------------------------------------------------------- fwht op
@pytest.mark.parametrize("n", [1, 2, 4, 32, 256])
def test_fwht_matches_dense_hadamard(n):
    x = torch.randn(3, 2, n, dtype=F64)
    expected = x @ hadamard(n) / math.sqrt(n)
    torch.testing.assert_close(ops.fwht(x), expected, rtol=0, atol=1e-13)


def test_fwht_is_orthonormal_involution_fp32():
    x = torch.randn(5, 1024)
    y = ops.fwht(x)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-5, atol=0)
    torch.testing.assert_close(ops.fwht(y), x, rtol=0, atol=1e-5)


def test_fwht_noncontiguous_input():
    x = torch.randn(16, 6, dtype=F64).t()  # (6, 16), last-dim stride 6
    torch.testing.assert_close(ops.fwht(x), x @ hadamard(16) / 4.0, rtol=0, atol=1e-13)
    torch.library.opcheck(ops.fwht, (x,))


def test_fwht_rejects_non_power_of_two():
    with pytest.raises(RuntimeError, match="power of two"):
        ops.fwht(torch.randn(3, 12))


@pytest.mark.parametrize("shape", [(8,), (3, 16), (2, 3, 4)])
def test_fwht_opcheck_and_gradcheck(shape):
    x = torch.randn(shape, dtype=F64, requires_grad=True)
    torch.library.opcheck(ops.fwht, (x,))
    assert torch.autograd.gradcheck(ops.fwht, (x,))
    assert torch.autograd.gradgradcheck(ops.fwht, (x,))


# ---------------------------------------------------------------- sparse sketch ops
def _sparse_inputs(n=12, c=5, d=6, nnz=3, requires_grad=False):
    g = torch.Generator().manual_seed(0)
    A = torch.randn(n, c, dtype=F64, generator=g, requires_grad=requires_grad)
    rows = torch.stack([torch.randperm(d, generator=g)[:nnz] for _ in range(n)])
    vals = torch.randn(n, nnz, dtype=F64, generator=g, requires_grad=requires_grad)
    S = torch.zeros(d, n, dtype=F64)
    S[rows, torch.arange(n)[:, None].expand(n, nnz)] = vals.detach()
    return A, rows, vals, S


def test_sparse_sketch_ops_match_dense():
    A, rows, vals, S = _sparse_inputs()
    torch.testing.assert_close(ops.sparse_sketch(A, rows, vals, S.shape[0]), S @ A, rtol=0, atol=1e-13)
    G = torch.randn(S.shape[0], 4, dtype=F64)
    torch.testing.assert_close(ops.sparse_sketch_t(G, rows, vals), S.t() @ G, rtol=0, atol=1e-13)


def test_sparse_sketch_ops_opcheck_and_gradcheck():
    A, rows, vals, S = _sparse_inputs(requires_grad=True)
    G = torch.randn(S.shape[0], 4, dtype=F64, requires_grad=True)
    torch.library.opcheck(ops.sparse_sketch, (A, rows, vals, S.shape[0]))
    torch.library.opcheck(ops.sparse_sketch_t, (G, rows, vals))
    assert torch.autograd.gradcheck(lambda a, v: ops.sparse_sketch(a, rows, v, S.shape[0]), (A, vals))
    assert torch.autograd.gradcheck(lambda g, v: ops.sparse_sketch_t(g, rows, v), (G, vals))


def test_sparse_sketch_rejects_out_of_range_rows():
    A, rows, vals, S = _sparse_inputs()
    with pytest.raises(RuntimeError, match=r"rows must lie in \[0, 6\)"):
        ops.sparse_sketch(A, rows + 1, vals, S.shape[0])
    with pytest.raises(RuntimeError, match=r"rows must lie in \[0, 6\)"):
        ops.sparse_sketch_t(torch.randn(6, 2, dtype=F64), rows - 1, vals)


# ---------------------------------------------------------------- operators vs their dense matrix
@pytest.mark.parametrize("kind", KINDS)
def test_apply_matches_dense_along_every_dim(kind):
    S = make_sketch(kind, 7, 13, generator=3, dtype=F64)
    D = S.to_dense()
    assert D.shape == S.shape == (7, 13)
    A = torch.randn(2, 13, 5, dtype=F64)
    torch.testing.assert_close(S.apply(A, dim=-2), D @ A, rtol=0, atol=1e-13)
    torch.testing.assert_close(S.apply(A.mT, dim=-1), A.mT @ D.t(), rtol=0, atol=1e-13)
    torch.testing.assert_close(S.apply(A.permute(1, 0, 2), dim=0), (D @ A).permute(1, 0, 2), rtol=0, atol=1e-13)
    B = torch.randn(3, 7, 2, dtype=F64)
    torch.testing.assert_close(S.transpose_apply(B, dim=1), D.t() @ B, rtol=0, atol=1e-13)


@pytest.mark.parametrize("kind", KINDS)
def test_expected_gram_is_identity(kind):
    """E[SᵀS] = I: the mean over T independent draws deviates by O(1/√(dT)) entrywise."""
    d, n, T = 8, 13, 300
    mean = sum(_gram(kind, d, n, seed) for seed in range(T)) / T
    bound = 6.0 / math.sqrt(d * T)  # 6 sigma for entries of variance <= 2/d, over 169 entries
    assert (mean - torch.eye(n, dtype=F64)).abs().max() < bound


def _gram(kind, d, n, seed):
    D = make_sketch(kind, d, n, generator=seed, dtype=F64).to_dense()
    return D.t() @ D


@pytest.mark.parametrize("kind", ["sparse_sign", "srht", "countsketch"])
def test_structured_columns_have_unit_norm(kind):
    D = make_sketch(kind, 6, 21, generator=1, dtype=F64).to_dense()
    torch.testing.assert_close(D.norm(dim=0), torch.ones(21, dtype=F64), rtol=0, atol=1e-13)


@pytest.mark.parametrize("vec_nnz", [1, 3, 8])
def test_sparse_sign_nonzero_structure(vec_nnz):
    d, n = 20, 4000
    S = SparseSignSketch(d, n, vec_nnz=vec_nnz, generator=7, dtype=F64)
    D = S.to_dense()
    assert ((D != 0).sum(0) == vec_nnz).all()  # distinct rows: no two nonzeros collide
    assert torch.allclose(D[D != 0].abs(), torch.tensor(vec_nnz ** -0.5, dtype=F64))
    signs = (D > 0).sum().item() / (n * vec_nnz)
    assert abs(signs - 0.5) < 6 * math.sqrt(0.25 / (n * vec_nnz))
    per_row = (D != 0).sum(1).double()  # uniform rows: each row holds n·k/d nonzeros ± binomial noise
    expected = n * vec_nnz / d
    assert (per_row - expected).abs().max() < 6 * math.sqrt(expected)


def test_countsketch_is_one_signed_entry_per_column():
    D = make_sketch("countsketch", 5, 50, generator=2, dtype=F64).to_dense()
    assert ((D != 0).sum(0) == 1).all() and set(D[D != 0].tolist()) <= {-1.0, 1.0}


def test_srht_pads_to_power_of_two_and_samples_distinct_rows():
    S = SRHTSketch(10, 37, generator=0, dtype=F64)
    assert S.padded_size == 64 and S.index.unique().numel() == 10
    assert math.isclose(S.scale, math.sqrt(64 / 10))
    D = S.to_dense()  # rows of √(N/d) H D restricted to 37 columns: entries ±1/√d
    assert torch.allclose(D.abs(), torch.full_like(D, 10 ** -0.5))


@pytest.mark.parametrize("kind", KINDS)
def test_reproducible_by_seed_different_otherwise(kind):
    same = [make_sketch(kind, 6, 30, generator=11, dtype=F64).to_dense() for _ in range(2)]
    assert torch.equal(*same)
    other = make_sketch(kind, 6, 30, generator=12, dtype=F64).to_dense()
    assert not torch.equal(same[0], other)
    g = torch.Generator().manual_seed(11)
    first, second = (make_sketch(kind, 6, 30, generator=g, dtype=F64).to_dense() for _ in range(2))
    assert torch.equal(first, same[0]) and not torch.equal(first, second)


def test_sketch_preserves_norms_of_a_subspace():
    """A subspace embedding: singular values of S U for orthonormal U (2000, 10) stay near 1 with d = 200."""
    U = torch.linalg.qr(torch.randn(2000, 10, dtype=F64)).Q
    for kind in KINDS:
        sv = torch.linalg.svdvals(make_sketch(kind, 200, 2000, generator=0, dtype=F64).apply(U, dim=0))
        assert 0.6 < sv.min() and sv.max() < 1.4, (kind, sv)


def test_operator_follows_input_dtype():
    S = make_sketch("srht", 4, 9, generator=0)  # float32 operator
    y = S.apply(torch.randn(9, 3, dtype=F64), dim=0)
    assert y.dtype == F64


def test_compiles_without_graph_breaks():
    S = make_sketch("srht", 8, 24, generator=0)
    T = make_sketch("sparse_sign", 8, 24, generator=0)
    fn = torch.compile(lambda A: S.apply(A, dim=-2) + T.apply(A, dim=-2), backend="aot_eager", fullgraph=True)
    A = torch.randn(24, 3)
    torch.testing.assert_close(fn(A), S.apply(A) + T.apply(A))


@pytest.mark.parametrize("bad, match", [
    (dict(kind="nope"), "unknown sketch"),
    (dict(sketch_size=0), "sketch_size must be a positive int"),
    (dict(input_size=2.5), "input_size must be a positive int"),
    (dict(kind="srht", sketch_size=40, input_size=30), "exceeds the padded input size 32"),
    (dict(kind="sparse_sign", vec_nnz=0), "vec_nnz"),
    (dict(dtype=torch.int64), "floating point"),
])
def test_construction_errors(bad, match):
    args = dict(kind="gaussian", sketch_size=4, input_size=10) | bad
    with pytest.raises(ValueError, match=match):
        make_sketch(args.pop("kind"), args.pop("sketch_size"), args.pop("input_size"), **args)


def test_apply_errors_name_the_shapes():
    S = make_sketch("sparse_sign", 4, 10, generator=0)
    with pytest.raises(ValueError, match=r"dim 0 of A must have size 10, got shape \(9, 3\)"):
        S.apply(torch.randn(9, 3), dim=0)
    with pytest.raises(ValueError, match="out of range"):
        S.apply(torch.randn(10, 3), dim=2)
    with pytest.raises(TypeError, match="floating-point"):
        S.apply(torch.ones(10, 3, dtype=torch.int64), dim=0)
    with pytest.raises(ValueError, match="must have size 4"):
        S.transpose_apply(torch.randn(10, 3), dim=0)


@pytest.mark.cuda
@pytest.mark.parametrize("kind", KINDS)
def test_cuda_matches_cpu(kind):
    cpu = make_sketch(kind, 16, 100, generator=5, dtype=F64)
    gpu = make_sketch(kind, 16, 100, generator=5, dtype=F64, device="cuda")
    A = torch.randn(100, 7, dtype=F64)
    torch.testing.assert_close(gpu.apply(A.cuda(), dim=0).cpu(), cpu.apply(A, dim=0), rtol=0, atol=1e-12)
    B = torch.randn(16, 3, dtype=F64)
    torch.testing.assert_close(gpu.transpose_apply(B.cuda(), dim=0).cpu(), cpu.transpose_apply(B, dim=0),
                               rtol=0, atol=1e-12)
    x = torch.randn(4, 512, device="cuda", requires_grad=True, dtype=F64)
    torch.library.opcheck(ops.fwht, (x,))
    A, rows, vals, S = _sparse_inputs(requires_grad=True)
    A, rows, vals = A.detach().cuda().requires_grad_(), rows.cuda(), vals.detach().cuda().requires_grad_()
    torch.library.opcheck(ops.sparse_sketch, (A, rows, vals, S.shape[0]))
    torch.library.opcheck(ops.sparse_sketch_t, (torch.randn(S.shape[0], 3, dtype=F64, device="cuda"), rows, vals))


def test_sparse_sign_rejects_a_bool_vec_nnz():
    with pytest.raises(ValueError, match="sparse_sign sketch: vec_nnz must be a positive int, got True"):
        SparseSignSketch(4, 10, vec_nnz=True, generator=0)


def test_integer_arguments_accept_numpy_integers():
    """Sizes computed with NumPy (np.int64) are integers like any other; bools are not (see above)."""
    import numpy as np

    from panther_fx.linalg import rsvd, svd_factors
    S = SparseSignSketch(np.int64(4), np.int64(10), vec_nnz=np.int64(2), generator=0)
    assert (S.sketch_size, S.vec_nnz) == (4, 2)
    A = torch.randn(20, 12, generator=torch.Generator().manual_seed(0), dtype=F64)
    assert rsvd(A, np.int64(3), oversample=np.int64(2), generator=0)[1].shape == (3,)
    assert svd_factors(A, np.int64(5))[0].shape[1] == 5


# ---------------------------------------------------------------- weight factorizations: arguments
@pytest.mark.parametrize("rank", [-2, 0, 31, True, 2.5])
def test_svd_and_asvd_factors_check_the_rank(rank):
    """rank=-2 gave rank-28 factors (U[:, :-2]), 0 empty ones, 45 silently rank 30."""
    from panther_fx.linalg import asvd_factors, svd_factors
    W = torch.randn(40, 30, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=rf"svd_factors: rank must be an int in \[1, min\(O, I\) = 30\], got {rank}"):
        svd_factors(W, rank)
    with pytest.raises(ValueError, match=rf"asvd_factors: rank must be an int in \[1, min\(O, I\) = 30\], got {rank}"):
        asvd_factors(W, W.T @ W, rank)


def test_sketch_factors_take_a_seed_like_the_rest():
    """docs: everything takes a torch.Generator or an int seed; an int raised AttributeError."""
    from panther_fx.linalg import as_generator, sketch_factors
    from panther_fx.linalg.conv import conv_sketch_factors
    W, K = torch.randn(8, 6), torch.randn(4, 2, 3, 3)
    for a, b in zip(sketch_factors(W, 2, 3, generator=3), sketch_factors(W, 2, 3, generator=as_generator(3))):
        assert torch.equal(a, b)
    for a, b in zip(conv_sketch_factors(K, 2, 3, generator=3), conv_sketch_factors(K, 2, 3, generator=as_generator(3))):
        assert torch.equal(a, b)


@pytest.mark.parametrize("fn", ["conv_svd_factors", "conv_sketch_factors"])
def test_conv_factors_need_groups_dividing_the_channels(fn):
    """O = 8 with groups = 3 failed inside a reshape ("shape '[8, 1, 1, 1]' is invalid")."""
    from panther_fx.linalg import conv
    args, kwargs = ((4,), {}) if fn == "conv_svd_factors" else ((1, 4), {"generator": 0})
    with pytest.raises(ValueError, match=rf"{fn}: groups = 3 must divide the 8 output channels"):
        getattr(conv, fn)(torch.randn(8, 2, 3, 3), *args, groups=3, **kwargs)
