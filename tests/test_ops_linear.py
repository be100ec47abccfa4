import pytest
import torch

import panther_fx  # noqa: F401  (registers torch.ops.panther)
from panther_fx.linalg import layer_generator, sketch_factors, sketch_weight

panther = torch.ops.panther


def lowrank_inputs(dtype=torch.float32, lead=(3, 5), I=12, O=10, r=4, bias=True, requires_grad=False):
    g = torch.Generator().manual_seed(0)
    make = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype).requires_grad_(requires_grad)  # noqa: E731
    return make(*lead, I), make(O, r), make(r, I), make(O) if bias else None


def sketched_inputs(dtype=torch.float32, lead=(3, 5), I=12, O=10, L=2, k=3, bias=True, requires_grad=False):
    g = torch.Generator().manual_seed(1)
    make = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype).requires_grad_(requires_grad)  # noqa: E731
    return make(*lead, I), make(L, I, k), make(L, k, O), make(L, k, O), make(L, I, k), make(O) if bias else None


def sketched_reference(x, S1, S2, U1, U2, bias):
    """Panther's formula term by term, in float64."""
    x, S1, S2, U1, U2 = (t.double() for t in (x, S1, S2, U1, U2))
    L = S1.shape[0]
    y = sum(x @ S1[i] @ U1[i] + x @ U2[i] @ S2[i] for i in range(L)) / (2 * L)
    return y if bias is None else y + bias.double()


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("lead", [(), (7,), (2, 3, 4)])
def test_lowrank_linear_matches_float64_reference(bias, lead):
    x, A, B, b = lowrank_inputs(lead=lead, bias=bias)
    y = panther.lowrank_linear(x, A, B, b)
    ref = x.double() @ B.double().T @ A.double().T + (b.double() if bias else 0)
    assert y.shape == (*lead, 10) and y.dtype == torch.float32
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("L", [1, 3])
def test_sketched_linear_matches_panther_formula(bias, L):
    args = sketched_inputs(L=L, bias=bias)
    y = panther.sketched_linear(*args)
    torch.testing.assert_close(y.double(), sketched_reference(*args), rtol=1e-5, atol=1e-6)


def test_non_contiguous_input():
    x, A, B, b = lowrank_inputs(lead=(6, 4), I=12)
    xt = x.transpose(0, 1)
    assert not xt.is_contiguous()
    torch.testing.assert_close(panther.lowrank_linear(xt, A, B, b), panther.lowrank_linear(xt.contiguous(), A, B, b))


@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
def test_half_precision(dtype, tol):
    x, A, B, b = lowrank_inputs(dtype=dtype)
    y = panther.lowrank_linear(x, A, B, b)
    assert y.dtype == dtype
    ref = x.double() @ B.double().T @ A.double().T + b.double()
    assert ((y.double() - ref).norm() / ref.norm()).item() < tol
    args = sketched_inputs(dtype=dtype)
    y = panther.sketched_linear(*args)
    ref = sketched_reference(*args)
    assert y.dtype == dtype and ((y.double() - ref).norm() / ref.norm()).item() < tol


@pytest.mark.parametrize("bias", [True, False])
def test_opcheck_lowrank(bias):
    torch.library.opcheck(panther.lowrank_linear.default, lowrank_inputs(bias=bias, requires_grad=True))


@pytest.mark.parametrize("bias", [True, False])
def test_opcheck_sketched(bias):
    torch.library.opcheck(panther.sketched_linear.default, sketched_inputs(bias=bias, requires_grad=True))


def test_gradcheck_float64():
    inputs = lowrank_inputs(dtype=torch.float64, lead=(2, 3), I=5, O=4, r=2, requires_grad=True)
    assert torch.autograd.gradcheck(panther.lowrank_linear, inputs)
    inputs = sketched_inputs(dtype=torch.float64, lead=(2, 3), I=5, O=4, L=2, k=2, requires_grad=True)
    assert torch.autograd.gradcheck(panther.sketched_linear, inputs)


def test_backward_only_requested_gradients():
    x, A, B, b = lowrank_inputs()
    x.requires_grad_(True)
    panther.lowrank_linear(x, A, B, b).sum().backward()
    assert x.grad is not None and A.grad is None and B.grad is None and b.grad is None


@pytest.mark.parametrize("bad, message", [
    (lambda x, A, B, b: (x[..., :5], A, B, b), "x has 5 features"),
    (lambda x, A, B, b: (x, A[:, :3], B, b), "disagree on r"),
    (lambda x, A, B, b: (x, A, B, b[:3]), "bias must have shape"),
    (lambda x, A, B, b: (x.double(), A, B, b), "dtypes differ"),
])
def test_lowrank_bad_inputs(bad, message):
    with pytest.raises(RuntimeError, match=message):
        panther.lowrank_linear(*bad(*lowrank_inputs()))


def test_sketched_bad_shape():
    x, S1, S2, U1, U2, b = sketched_inputs()
    with pytest.raises(RuntimeError, match=r"U2 must have shape"):
        panther.sketched_linear(x, S1, S2, U1, U2[:, :, :2], b)


def test_sketch_factors_are_unbiased_and_seeded():
    W = torch.randn(24, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    a = sketch_factors(W, 2, 4, generator=layer_generator(0, "fc"))
    b = sketch_factors(W, 2, 4, generator=layer_generator(0, "fc"))
    c = sketch_factors(W, 2, 4, generator=layer_generator(0, "fc2"))
    assert all(torch.equal(s, t) for s, t in zip(a, b)) and not torch.equal(a[2], c[2])
    S1, S2, U1, U2 = a
    assert set(U1.abs().unique().tolist()) == {0.5}  # ±1/√k with k = 4
    # E[Ŵ] = W: average the estimate over many independent draws
    g = torch.Generator().manual_seed(3)
    mean = sum(sketch_weight(*sketch_factors(W, 1, 4, generator=g)) for _ in range(2000)) / 2000
    assert ((mean - W).norm() / W.norm()).item() < 0.1


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_runs_in_the_current_autocast_dtype(dtype):
    x, A, B, b = lowrank_inputs()
    with torch.autocast("cpu", dtype=dtype):
        assert panther.lowrank_linear(x, A, B, b).dtype == dtype
        assert panther.sketched_linear(*sketched_inputs()).dtype == dtype
        assert torch.nn.functional.linear(x, A @ B, b).dtype == dtype  # the ATen op they replace
    assert panther.lowrank_linear(x, A, B, b).dtype == torch.float32
    # float64 is not autocast (ATen's rule): a float64 layer keeps its precision inside the region.
    x, A, B, b = (t.double() for t in (x, A, B, b))
    with torch.autocast("cpu", dtype=dtype):
        assert torch.nn.functional.linear(x, A @ B, b).dtype == torch.float64
        torch.testing.assert_close(panther.lowrank_linear(x, A, B, b), torch.nn.functional.linear(x, A @ B, b))
