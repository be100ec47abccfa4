"""SKLinear and LowRankLinear: Panther's math in float64, initialisation scale, seeds, from_dense, gradients,
one panther op under torch.compile, and training."""

import math

import pytest
import torch
from torch import nn

from panther_fx.linalg import as_generator, sketch_factors
from panther_fx.nn import LowRankLinear, SKLinear

D = torch.float64


def panther_reference(x, S1, S2, U1, U2, bias):
    """Panther's SKLinear forward written term by term: 1/(2L) Σ_i (x S1_i U1_i + x U2_i S2_i) + b."""
    L = S1.shape[0]
    y = sum(x @ S1[i] @ U1[i] + x @ U2[i] @ S2[i] for i in range(L)) / (2 * L)
    return y if bias is None else y + bias


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("lead", [(), (5,), (2, 3)])
def test_sklinear_matches_panther_formula_float64(bias, lead):
    layer = SKLinear(12, 7, num_terms=3, low_rank=4, bias=bias, dtype=D, seed=1)
    with torch.no_grad():  # random factors, not just the initial sketch
        layer.S1s.normal_()
        layer.S2s.normal_()
    x = torch.randn(*lead, 12, dtype=D)
    expected = panther_reference(x, layer.S1s, layer.S2s, layer.U1s, layer.U2s, layer.bias)
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)
    assert layer(x).shape == (*lead, 7)


def test_sklinear_layout_and_signs():
    layer = SKLinear(10, 6, num_terms=2, low_rank=3, seed=0)
    assert layer.S1s.shape == (2, 10, 3) and layer.S2s.shape == (2, 3, 6)
    assert layer.U1s.shape == (2, 3, 6) and layer.U2s.shape == (2, 10, 3)
    for U in (layer.U1s, layer.U2s):
        torch.testing.assert_close(U.abs(), torch.full_like(U, 1 / math.sqrt(3)))
    assert {n for n, _ in layer.named_parameters()} == {"S1s", "S2s", "bias"}
    assert {n for n, _ in layer.named_buffers()} == {"U1s", "U2s"}


def test_lowrank_matches_formula_float64():
    layer = LowRankLinear(9, 5, rank=3, dtype=D, seed=0)
    x = torch.randn(4, 2, 9, dtype=D)
    torch.testing.assert_close(layer(x), (x @ layer.B.T) @ layer.A.T + layer.bias, rtol=1e-12, atol=1e-12)
    assert LowRankLinear(9, 5, rank=3, bias=False, seed=0)(x.float()).shape == (4, 2, 5)


@pytest.mark.parametrize("I,O,L,k", [(256, 128, 1, 16), (128, 384, 2, 8), (512, 512, 1, 32)])
def test_default_init_keeps_nn_linear_scale(I, O, L, k):
    """Outputs of the fresh layers have nn.Linear's standard deviation (within 8%), bias included."""
    torch.manual_seed(0)
    x = torch.randn(2048, I)
    dense = nn.Linear(I, O)(x).std().item()
    for layer in (SKLinear(I, O, L, k, seed=3), LowRankLinear(I, O, k, seed=3)):
        ratio = layer(x).std().item() / dense
        assert 0.92 < ratio < 1.08, (type(layer).__name__, ratio)
        assert layer.bias.abs().max() <= 1 / math.sqrt(I)  # nn.Linear's bound (Panther used 1/sqrt(O))


def test_plain_sketch_of_random_init_would_inflate_outputs():
    """Why SKLinear rescales its default init: the raw sketch of a Linear-like W has ~sqrt(1 + (I+O)/(4Lk))
    times its norm; with W_init (semantics: estimate that W) no rescaling is applied."""
    I, O, L, k = 256, 256, 1, 8
    W = nn.Linear(I, O).weight.detach()
    raw = SKLinear(I, O, L, k, W_init=W, seed=0)
    inflation = (raw.dense_weight().norm() / W.norm()).item()
    assert inflation == pytest.approx(math.sqrt(1 + (I + O) / (4 * L * k)), rel=0.15)
    fresh = SKLinear(I, O, L, k, seed=0)
    assert fresh.dense_weight().norm().item() == pytest.approx(1 / math.sqrt(3) * math.sqrt(O), rel=0.05)


def test_explicit_seed_is_reproducible_and_leaves_global_rng_alone():
    state = torch.get_rng_state()
    a, b = SKLinear(16, 8, 2, 4, seed=5), SKLinear(16, 8, 2, 4, seed=5)
    c = LowRankLinear(16, 8, 4, seed=5)
    assert torch.equal(torch.get_rng_state(), state)
    for name in ("S1s", "S2s", "U1s", "U2s", "bias"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    assert not torch.equal(a.U1s, SKLinear(16, 8, 2, 4, seed=6).U1s)
    assert torch.equal(c.A, LowRankLinear(16, 8, 4, seed=5).A)
    gen_layer = SKLinear(16, 8, 2, 4, seed=torch.Generator().manual_seed(5))
    assert torch.equal(gen_layer.U1s, a.U1s)


def test_seed_none_follows_torch_manual_seed():
    torch.manual_seed(11)
    a = SKLinear(16, 8, 1, 4)
    torch.manual_seed(11)
    b = SKLinear(16, 8, 1, 4)
    assert torch.equal(a.U2s, b.U2s) and torch.equal(a.S1s, b.S1s)


def test_sklinear_from_dense_is_the_shared_sketch_and_copies_bias():
    dense = nn.Linear(20, 12).double()
    layer = SKLinear.from_dense(dense, num_terms=2, low_rank=5, seed=7)
    S1, S2, U1, U2 = sketch_factors(dense.weight, 2, 5, generator=as_generator(7))
    for got, want in zip((layer.S1s, layer.S2s, layer.U1s, layer.U2s), (S1, S2, U1, U2)):
        assert torch.equal(got, want)
    assert torch.equal(layer.bias, dense.bias) and layer.bias.data_ptr() != dense.bias.data_ptr()
    assert layer.S1s.dtype == D and layer.U1s.dtype == D


def test_sklinear_from_dense_error_follows_panther_formula():
    """The sketch is an unbiased estimate of W: averaging L terms shrinks the relative error like
    sqrt((I + O) / (4 L k)) (notes/panther-prior-art.md §2), down to 0 in the limit."""
    I, O, k = 48, 32, 4
    dense = nn.Linear(I, O).double()
    W = dense.weight.detach()
    for L in (1, 400):
        errors = [((SKLinear.from_dense(dense, L, k, seed=s).dense_weight() - W).norm() / W.norm()).item()
                  for s in range(3)]
        assert sum(errors) / 3 == pytest.approx(math.sqrt((I + O) / (4 * L * k)), rel=0.25), L


def test_lowrank_from_dense_is_optimal_truncated_svd():
    dense = nn.Linear(30, 18).double()
    W = dense.weight.detach()
    S = torch.linalg.svdvals(W)
    layer = LowRankLinear.from_dense(dense, rank=6)
    err = (layer.dense_weight() - W).norm().item()
    assert err == pytest.approx(S[6:].norm().item(), rel=1e-9)  # Eckart–Young
    full = LowRankLinear.from_dense(dense, rank=18)
    x = torch.randn(3, 30, dtype=D)
    torch.testing.assert_close(full(x), dense(x), rtol=1e-10, atol=1e-10)
    assert torch.equal(layer.bias, dense.bias)


def test_constructor_errors():
    with pytest.raises(ValueError, match=r"W_init must be \(out_features, in_features\) = \(4, 6\)"):
        SKLinear(6, 4, 1, 2, W_init=torch.randn(6, 4))
    with pytest.raises(ValueError, match="low_rank=0"):
        SKLinear(6, 4, 1, 0)
    with pytest.raises(ValueError, match="rank=0"):
        LowRankLinear(6, 4, 0)


@pytest.mark.parametrize("rank, message", [(-1, "rank=-1 must be an integer >= 1"), (0, "rank=0 must be"),
                                           (2.5, "rank=2.5 must be an integer"),
                                           (17, r"rank=17 exceeds min\(in_features, out_features\) = 16")])
def test_lowrank_from_dense_rejects_bad_rank(rank, message):
    # used to slice silently: rank -1 gave rank 15, 0 a bias-only layer, 17 a clamped rank 16
    with pytest.raises(ValueError, match=rf"LowRankLinear.from_dense: {message}"):
        LowRankLinear.from_dense(nn.Linear(24, 16), rank)


@pytest.mark.parametrize("num_terms, low_rank, message", [(0, 4, "num_terms=0"), (1, 0, "low_rank=0"),
                                                          (1, -2, "low_rank=-2"), (True, 4, "num_terms=True")])
def test_sklinear_from_dense_rejects_bad_sizes(num_terms, low_rank, message):
    with pytest.raises(ValueError, match=rf"SKLinear.from_dense: {message} must be an integer >= 1"):
        SKLinear.from_dense(nn.Linear(24, 16), num_terms, low_rank)


def test_extra_repr():
    assert repr(SKLinear(6, 4, 2, 3, seed=0)) == "SKLinear(in_features=6, out_features=4, num_terms=2, low_rank=3, bias=True)"
    assert repr(LowRankLinear(6, 4, 2, bias=False, seed=0)) == "LowRankLinear(in_features=6, out_features=4, rank=2, bias=False)"


@pytest.mark.parametrize("make", [lambda: SKLinear(5, 4, 2, 2, dtype=D, seed=0),
                                  lambda: LowRankLinear(5, 4, 2, dtype=D, seed=0)])
def test_gradcheck_float64(make):
    layer = make()
    x = torch.randn(3, 5, dtype=D, requires_grad=True)
    params = [p for p in layer.parameters()]
    names = [n for n, _ in layer.named_parameters()]

    def f(x, *ps):
        return torch.func.functional_call(layer, dict(zip(names, ps)), (x,))

    assert torch.autograd.gradcheck(f, (x, *params))


@pytest.mark.parametrize("make,op", [(lambda: SKLinear(8, 6, 2, 2, seed=0), "sketched_linear"),
                                     (lambda: LowRankLinear(8, 6, 3, seed=0), "lowrank_linear")])
def test_forward_is_one_panther_op_under_compile(make, op):
    from torch._dynamo.testing import EagerAndRecordGraphs

    layer = make()
    backend = EagerAndRecordGraphs()
    x = torch.randn(4, 8)
    out = torch.compile(layer, backend=backend, fullgraph=True)(x)
    torch.testing.assert_close(out, layer(x))
    (graph,) = backend.graphs
    calls = [n.target for n in graph.graph.nodes if n.op == "call_function"]
    assert calls == [getattr(torch.ops.panther, op).default] or calls == [getattr(torch.ops.panther, op)]


@pytest.mark.parametrize("opt", [lambda p: torch.optim.SGD(p, lr=0.5, momentum=0.9),
                                 lambda p: torch.optim.Adam(p, lr=1e-2)])
@pytest.mark.parametrize("make", [lambda: SKLinear(32, 16, 2, 4, seed=0), lambda: LowRankLinear(32, 16, 4, seed=0)])
def test_training_reduces_loss(opt, make):
    """Fit a teacher of the same class and seed (same fixed signs, so the target is representable: an
    SKLinear can only express weights in the span of its signs) with redrawn parameters."""
    g = torch.Generator().manual_seed(0)
    teacher, student = make(), make()
    with torch.no_grad():
        for p in teacher.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * p.std())
    x = torch.randn(256, 32, generator=g)
    y = teacher(x).detach()
    optimizer = opt(student.parameters())
    losses = []
    for _ in range(60):
        loss = nn.functional.mse_loss(student(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 10
    if isinstance(student, SKLinear):
        assert student.U1s.grad is None and student.U2s.grad is None


@pytest.mark.cuda
def test_cuda_layers_match_cpu_float64():
    """A seed gives the same layer on every device (up to the rounding of the factors computed on the device:
    S1, S2 and their norm scales); CUDA outputs and gradients match the CPU in float64."""
    for make in (lambda dev: SKLinear(40, 24, 2, 4, dtype=D, device=dev, seed=3),
                 lambda dev: LowRankLinear(40, 24, 5, dtype=D, device=dev, seed=3)):
        cpu, gpu = make("cpu"), make("cuda")
        for (name, p), q in zip(cpu.state_dict().items(), gpu.state_dict().values()):
            assert q.is_cuda, name
            torch.testing.assert_close(q.cpu(), p, rtol=1e-13, atol=1e-15, msg=name)
        x = torch.randn(7, 40, dtype=D)
        y_cpu, y_gpu = cpu(x), gpu(x.cuda())
        torch.testing.assert_close(y_gpu.cpu(), y_cpu, rtol=1e-10, atol=1e-10)
        y_cpu.square().sum().backward()
        y_gpu.square().sum().backward()
        for p, q in zip(cpu.parameters(), gpu.parameters()):
            torch.testing.assert_close(q.grad.cpu(), p.grad, rtol=1e-10, atol=1e-10)
