"""Native kernels of panther_fx._C vs the pure-PyTorch reference bodies of the ops (panther_fx/ops/linear.py).

The reference of each op is its Python body (``linear_ops.<op>_body``); the registered kernel is what
``torch.ops.panther.<op>`` dispatches to. Token counts straddle the kernels' internal thresholds (sliced vs
concatenated sketch factors on CPU, fused vs cuBLAS on CUDA) so every path is compared.
"""

from __future__ import annotations

import glob
import os

import pytest
import torch

import panther_fx
from panther_fx.ops import linear as linear_ops

panther = torch.ops.panther
OPS = ("lowrank_linear", "lowrank_linear_with_t", "sketched_linear", "lowrank_linear_backward", "sketched_linear_backward")
BUILT = bool(glob.glob(os.path.join(os.path.dirname(panther_fx.__file__), "_C*.so")))
needs_ext = pytest.mark.skipif(not BUILT or os.environ.get("PANTHER_NO_EXT") == "1",
                               reason="panther_fx._C is not built (PANTHER_BUILD_EXT=0) or disabled")
# Half precisions: a few units in the last place of y, because the fused CUDA kernel keeps the rank-r
# intermediate in fp32 while the reference rounds it to the dtype (bf16 eps 7.8e-3, fp16 eps 9.8e-4).
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
       torch.float16: dict(rtol=5e-3, atol=5e-3), torch.float64: dict(rtol=1e-12, atol=1e-12)}


def reference(op: str):
    return getattr(linear_ops, f"{op}_body")


def rnd(gen, *shape, dtype, device, scale=1.0):
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(device=device, dtype=dtype)


def make_inputs(method, lead, I=48, O=40, r=12, L=1, bias=True, dtype=torch.float32, device="cpu",
                noncontig=False, seed=0):
    """x (*lead, I) plus factors scaled so that y has entries of order one."""
    gen = torch.Generator().manual_seed(seed)
    if noncontig:  # x as a strided view: every other feature of a wider tensor
        x = rnd(gen, *lead, 2 * I, dtype=dtype, device=device)[..., ::2]
        assert not x.is_contiguous()
    else:
        x = rnd(gen, *lead, I, dtype=dtype, device=device)
    if method == "lowrank":
        factors = [rnd(gen, O, r, dtype=dtype, device=device, scale=r**-0.5),
                   rnd(gen, r, I, dtype=dtype, device=device, scale=I**-0.5)]
    else:
        k = r
        factors = [rnd(gen, L, I, k, dtype=dtype, device=device, scale=I**-0.5),
                   rnd(gen, L, k, O, dtype=dtype, device=device, scale=k**-0.5),
                   rnd(gen, L, k, O, dtype=dtype, device=device, scale=k**-0.5),
                   rnd(gen, L, I, k, dtype=dtype, device=device, scale=I**-0.5)]
    b = rnd(gen, O, dtype=dtype, device=device) if bias else None
    return x, factors, b


def native_calls(kernel: str) -> int:
    return panther._native_calls(kernel)


@needs_ext
def test_native_kernels_registered_and_reported():
    info = panther_fx.kernel_info()
    assert info["extension"] == "loaded"
    for op in OPS:
        assert info["ops"][op]["cpu"], f"{op} has no native CPU kernel"
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"panther::{op}", "CPU")
    assert info["torch"] == torch.__version__


def test_kernel_info_reads_tf32_set_through_the_new_api():
    """torch refuses to read the legacy allow_tf32 once fp32_precision was set: kernel_info raised."""
    matmul = torch.backends.cuda.matmul
    saved = matmul.fp32_precision
    try:
        for precision, tf32 in (("tf32", True), ("ieee", False)):
            matmul.fp32_precision = precision
            assert panther_fx.kernel_info()["tf32_matmul"] is tf32
    finally:
        matmul.fp32_precision = saved


@needs_ext
@pytest.mark.parametrize("method", ["lowrank", "sketched"])
def test_native_kernel_runs(method):
    x, factors, b = make_inputs(method, (5,))
    before = native_calls(f"{method}_linear.cpu")
    getattr(panther, f"{method}_linear")(x, *factors, b)
    assert native_calls(f"{method}_linear.cpu") == before + 1
    x.requires_grad_(True)
    before = native_calls(f"{method}_linear_backward.cpu")
    getattr(panther, f"{method}_linear")(x, *factors, b).sum().backward()
    assert native_calls(f"{method}_linear_backward.cpu") == before + 1


@needs_ext
def test_lowrank_keeps_t_only_when_A_needs_a_gradient():
    """Training (A requires grad) runs lowrank_linear_with_t and takes gA from the kept t; a frozen A, or no
    grad mode, runs the plain op, which keeps nothing."""
    x, (A, B), b = make_inputs("lowrank", (6,))

    def kernels_run(fn):
        names = ("lowrank_linear.cpu", "lowrank_linear_with_t.cpu")
        before = [native_calls(n) for n in names]
        fn()
        return [native_calls(n) - c for n, c in zip(names, before)]

    A.requires_grad_(True)
    assert kernels_run(lambda: panther.lowrank_linear(x, A, B, b).sum().backward()) == [0, 1]
    with torch.no_grad():
        assert kernels_run(lambda: panther.lowrank_linear(x, A, B, b)) == [1, 0]
    A.requires_grad_(False)
    x.requires_grad_(True)
    assert kernels_run(lambda: panther.lowrank_linear(x, A, B, b).sum().backward()) == [1, 0]
    y, t = panther.lowrank_linear_with_t(x.detach(), A, B, b)
    torch.testing.assert_close(t, x.detach() @ B.t(), rtol=0, atol=0)
    torch.testing.assert_close(y, reference("lowrank_linear")(x.detach(), A, B, b), **TOL[torch.float32])


def check_forward(method, device, dtype, lead, bias, noncontig, L=1, r=12):
    x, factors, b = make_inputs(method, lead, r=r, L=L, bias=bias, dtype=dtype, device=device, noncontig=noncontig)
    op = f"{method}_linear"
    got = getattr(panther, op)(x, *factors, b)
    want = reference(op)(x, *factors, b)
    assert got.shape == (*lead, 40) and got.dtype == dtype
    torch.testing.assert_close(got, want, **TOL[dtype])
    # and against float64 truth, at the dtype's tolerance
    truth = reference(op)(x.double(), *(f.double() for f in factors), None if b is None else b.double())
    torch.testing.assert_close(got.double(), truth, rtol=TOL[dtype]["rtol"] * 4, atol=TOL[dtype]["atol"] * 4)


# (3,) tokens <= 2k uses the sliced CPU path, (4, 25) = 100 tokens the concatenated one; () is a single vector.
LEADS = [(), (3,), (4, 25)]


@needs_ext
@pytest.mark.parametrize("method", ["lowrank", "sketched"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lead", LEADS)
@pytest.mark.parametrize("bias", [True, False])
def test_forward_parity_cpu(method, dtype, lead, bias):
    check_forward(method, "cpu", dtype, lead, bias, noncontig=False)


@needs_ext
@pytest.mark.parametrize("method", ["lowrank", "sketched"])
@pytest.mark.parametrize("lead", [(3,), (4, 25)])
@pytest.mark.parametrize("L", [1, 3])
def test_forward_noncontiguous_and_terms_cpu(method, lead, L):
    check_forward(method, "cpu", torch.float32, lead, True, noncontig=True, L=L)


def check_backward(method, device, dtype, lead, needs, L=1, noncontig=False):
    x, factors, b = make_inputs(method, lead, L=L, dtype=dtype, device=device, noncontig=noncontig)
    gen = torch.Generator().manual_seed(1)
    gy = rnd(gen, *lead, 40, dtype=dtype, device=device)
    op = f"{method}_linear_backward"
    got = getattr(panther, op)(gy, x, *factors, needs)
    want = reference(op)(gy, x, *factors, needs)
    assert len(got) == len(needs)
    for i, (g, w, need) in enumerate(zip(got, want, needs)):
        assert (g is None) == (not need), f"gradient {i}: needs={need} but got {g is not None}"
        if need:
            torch.testing.assert_close(g, w, **TOL[dtype], msg=lambda m: f"gradient {i}: {m}")


def all_needs(method):
    n = 4 if method == "lowrank" else 6
    return [[True] * n, [True] + [False] * (n - 1), [False] * (n - 1) + [True], [i % 2 == 1 for i in range(n)]]


@needs_ext
@pytest.mark.parametrize("method", ["lowrank", "sketched"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lead", LEADS)
def test_backward_parity_cpu(method, dtype, lead):
    for needs in all_needs(method):
        check_backward(method, "cpu", dtype, lead, needs)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tokens", [8, 32])
def test_reduced_precision_sketch_is_as_accurate_as_the_reference(dtype, tokens):
    """At tokens <= 2k the CPU kernel used one GEMM per rank-k term, adding each into the bf16/fp16 output: 2L
    roundings of y and of gx (3x the reference's error vs float64 at L = 16) where one GEMM accumulates in
    fp32. Reduced precision now always takes the concatenated GEMM."""
    x, factors, _ = make_inputs("sketched", (tokens,), I=256, O=256, r=16, L=16, bias=False, dtype=dtype)
    gy = rnd(torch.Generator().manual_seed(1), tokens, 256, dtype=dtype, device="cpu")
    needs = [True] + [False] * 5
    wide = [t.double() for t in (x, *factors)]
    y64 = reference("sketched_linear")(*wide)
    gx64 = reference("sketched_linear_backward")(gy.double(), *wide, needs)[0]
    rel = lambda got, want: ((got.double() - want).norm() / want.norm()).item()  # noqa: E731
    for got, ref, want in (
            (panther.sketched_linear(x, *factors), reference("sketched_linear")(x, *factors), y64),
            (panther.sketched_linear_backward(gy, x, *factors, needs)[0],
             reference("sketched_linear_backward")(gy, x, *factors, needs)[0], gx64)):
        assert rel(got, want) <= 1.2 * rel(ref, want)


@needs_ext
@pytest.mark.parametrize("lead", [(3,), (4, 25)])
def test_backward_noncontiguous_terms_cpu(lead):
    check_backward("sketched", "cpu", torch.float32, lead, [True] * 6, L=3, noncontig=True)
    check_backward("lowrank", "cpu", torch.float32, lead, [True] * 4, noncontig=True)


@pytest.mark.parametrize("method", ["lowrank", "sketched"])
@pytest.mark.parametrize("lead", [(3,), (4, 25)])
def test_autograd_matches_float64_autograd(method, lead):
    """Gradients through the op (native backward kernel) vs autograd through the float64 reference body."""
    x, factors, b = make_inputs(method, lead, L=2)
    inputs = [t.requires_grad_(True) for t in (x, *factors, b)]
    getattr(panther, f"{method}_linear")(*inputs).square().sum().backward()
    inputs64 = [t.detach().double().requires_grad_(True) for t in inputs]
    reference(f"{method}_linear")(*inputs64).square().sum().backward()
    for t, t64 in zip(inputs, inputs64):
        torch.testing.assert_close(t.grad.double(), t64.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", ["lowrank", "sketched"])
@pytest.mark.parametrize("bias", [True, False])
def test_opcheck_cpu(method, bias):
    x, factors, b = make_inputs(method, (2, 3), L=2, bias=bias)
    args = [t.requires_grad_(True) for t in (x, *factors)] + [b]
    torch.library.opcheck(getattr(panther, f"{method}_linear").default, tuple(args))
    if method == "lowrank":  # no derivative of its own: called below autograd, on inputs without grad
        torch.library.opcheck(panther.lowrank_linear_with_t.default, (x.detach(), *(f.detach() for f in factors), b))
    gy = torch.randn(2, 3, 40)
    for needs in all_needs(method)[:2]:
        torch.library.opcheck(getattr(panther, f"{method}_linear_backward").default, (gy, x.detach(),
                              *(f.detach() for f in factors), needs))


def test_errors_name_the_op_and_shapes():
    x, (A, B), b = make_inputs("lowrank", (3,))
    with pytest.raises(RuntimeError, match=r"lowrank_linear: x has 47 features"):
        panther.lowrank_linear(x[:, :47], A, B, b)
    with pytest.raises(RuntimeError, match=r"lowrank_linear: bias must have shape \(40,\)"):
        panther.lowrank_linear(x, A, B, b[:5])
    x, (S1, S2, U1, U2), b = make_inputs("sketched", (3,))
    with pytest.raises(RuntimeError, match=r"sketched_linear: U1 must have shape"):
        panther.sketched_linear(x, S1, S2, U1[:, :5], U2, b)
    # L = 0 has no 1/(2L) scale: refused by both (the GEMM form used to return uninitialised memory).
    for run in (panther.sketched_linear, reference("sketched_linear")):
        with pytest.raises(RuntimeError, match=r"sketched_linear: S1 \(0, 48, 12\) has no terms \(L = 0\)"):
            run(x, S1[:0], S2[:0], U1[:0], U2[:0], b)
    # a 0-d x: the same message as lowrank_linear's from the kernel, the body and the fake (an IndexError before)
    for run, arg in ((panther.sketched_linear, x[0, 0]), (reference("sketched_linear"), x[0, 0]),
                     (panther.sketched_linear, x[0, 0].to("meta"))):
        factors = [t.to(arg.device) for t in (S1, S2, U1, U2)]
        with pytest.raises(RuntimeError, match="sketched_linear: x must have at least one dimension"):
            run(arg, *factors, None)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("tokens", [3, 300])
def test_degenerate_sizes_match_the_reference(device, tokens):
    """Rank 0 gives the bias; no output features give an empty result (the fused CUDA kernel must not be
    launched on either: an empty grid is invalid and it divides by the rank)."""
    x, (S1, S2, U1, U2), b = make_inputs("sketched", (tokens,), L=2, device=device)
    out = panther.sketched_linear(x, S1[..., :0], S2[:, :0], U1[:, :0], U2[..., :0], b)
    torch.testing.assert_close(out, b.expand(tokens, -1), rtol=0, atol=0)
    x, (A, B), b = make_inputs("lowrank", (tokens,), device=device)
    torch.testing.assert_close(panther.lowrank_linear(x, A[:, :0], B[:0], b), b.expand(tokens, -1), rtol=0, atol=0)
    assert panther.lowrank_linear(x, A[:0], B, b[:0]).shape == (tokens, 0)
    assert panther.sketched_linear(x.new_zeros(tokens, 48), S1, S2[..., :0], U1[..., :0], U2, b[:0]).shape == (tokens, 0)


# ---- CUDA (skipped without a GPU) -------------------------------------------------------------------------------
CUDA_TOKENS = [(1,), (7,), (3, 50), (300,), (4, 256)]  # fused kernel while tokens·in·rank <= 2^17, cuBLAS above
# The CUDA kernels are built when a CUDA toolkit is found (setup.py); without them the ops' PyTorch bodies
# run on CUDA and the tests below that do not count native calls still check them.
needs_cuda_ext = pytest.mark.skipif(not panther_fx.kernel_info()["ops"]["lowrank_linear"]["cuda"],
                                    reason="CUDA kernels not built (needs a CUDA toolkit at install time, or PANTHER_CUDA=1)")


@pytest.mark.cuda
@needs_cuda_ext
def test_cuda_kernels_registered():
    info = panther_fx.kernel_info()
    for op in OPS:
        assert info["ops"][op]["cuda"], f"{op} has no native CUDA kernel"
    assert info["device"] == torch.cuda.get_device_name(0)


@pytest.mark.cuda
@needs_cuda_ext
@pytest.mark.parametrize("method", ["lowrank", "sketched"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("lead", CUDA_TOKENS)
@pytest.mark.parametrize("bias", [True, False])
def test_forward_parity_cuda(method, dtype, lead, bias):
    before = native_calls(f"{method}_linear.cuda")
    check_forward(method, "cuda", dtype, lead, bias, noncontig=False)
    check_forward(method, "cuda", dtype, lead, bias, noncontig=True, L=3)
    assert native_calls(f"{method}_linear.cuda") == before + 2


@pytest.mark.cuda
@pytest.mark.parametrize("method", ["lowrank", "sketched"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lead", CUDA_TOKENS)
def test_backward_parity_cuda(method, dtype, lead):
    for needs in all_needs(method):
        check_backward(method, "cuda", dtype, lead, needs, L=2)


@pytest.mark.cuda
def test_cuda_fp32_is_not_tf32_by_default():
    """fp32 stays fp32 unless allow_tf32 says otherwise: error vs float64 far below TF32's 1e-3."""
    assert not torch.backends.cuda.matmul.allow_tf32
    x, factors, b = make_inputs("lowrank", (512,), I=1024, O=1024, r=256, device="cuda")
    got = panther.lowrank_linear(x, *factors, b).double()
    truth = reference("lowrank_linear")(x.double(), *(f.double() for f in factors), b.double())
    assert (got - truth).abs().max().item() < 1e-4


@pytest.mark.cuda
@needs_cuda_ext
def test_cuda_deterministic_mode_gives_identical_sketched_results():
    """The fused sketched kernel sums with shared-memory atomics when 2Lk < 512; under
    torch.use_deterministic_algorithms the op takes the GEMM form instead, so repeated runs are identical."""
    x, factors, b = make_inputs("sketched", (4,), L=2, device="cuda")
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        runs = [panther.sketched_linear(x, *factors, b) for _ in range(20)]
    finally:
        torch.use_deterministic_algorithms(was)
    assert all(torch.equal(r, runs[0]) for r in runs)
    torch.testing.assert_close(runs[0], reference("sketched_linear")(x, *factors, b), **TOL[torch.float32])


@pytest.mark.cuda
def test_cuda_current_stream():
    x, factors, b = make_inputs("sketched", (4,), device="cuda")
    want = reference("sketched_linear")(x, *factors, b)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        got = panther.sketched_linear(x, *factors, b)
    stream.synchronize()
    torch.testing.assert_close(got, want, **TOL[torch.float32])


@pytest.mark.cuda
@pytest.mark.parametrize("method", ["lowrank", "sketched"])
@pytest.mark.parametrize("tokens", [4, 300])
def test_opcheck_cuda(method, tokens):
    x, factors, b = make_inputs(method, (tokens,), L=2, device="cuda")
    args = [t.requires_grad_(True) for t in (x, *factors)] + [b]
    torch.library.opcheck(getattr(panther, f"{method}_linear").default, tuple(args))
    if method == "lowrank":
        torch.library.opcheck(panther.lowrank_linear_with_t.default, (x.detach(), *(f.detach() for f in factors), b))
    gy = torch.randn(tokens, 40, device="cuda")
    torch.library.opcheck(getattr(panther, f"{method}_linear_backward").default,
                          (gy, x.detach(), *(f.detach() for f in factors), all_needs(method)[0]))


def test_info_cli_lists_native_kernels(capsys):
    from panther_fx.cli.main import main

    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"torch {torch.__version__}" in out
    row = next(line for line in out.splitlines() if line.startswith("lowrank_linear "))
    assert row.split()[1] == ("yes" if panther_fx.ops.extension_loaded() else "-")
    assert main(["info", "--json"]) == 0
    assert '"sketched_linear_backward"' in capsys.readouterr().out
