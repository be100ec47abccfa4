"""Autograd of the linear and attention ops: the C++ kernels of csrc/autograd.cpp (extension loaded) against the
Python register_autograd formulas of panther_fx/ops (extension disabled, in a subprocess): same gradients for
every input, absent optional inputs included, and the same refusal of double backward."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import panther_fx

panther = torch.ops.panther
NATIVE_AUTOGRAD = ("lowrank_linear", "sketched_linear", "performer_attention")
BUILT = panther_fx.kernel_info()["extension"] == "loaded"
needs_ext = pytest.mark.skipif(not BUILT, reason="panther_fx._C is not built or disabled (PANTHER_NO_EXT=1)")

# Seeded float64 inputs, each case a (name, op call, inputs) triple; the script runs in both processes.
CASES = textwrap.dedent("""
    import torch
    panther = torch.ops.panther

    def cases():
        g = torch.Generator().manual_seed(0)
        r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).requires_grad_()
        x, A, B, b = r(2, 3, 6), r(5, 2), r(2, 6), r(5)
        S1, S2, U1, U2 = r(2, 6, 2), r(2, 2, 5), r(2, 2, 5), r(2, 6, 2)
        q, k, v, W = r(1, 2, 7, 4), r(1, 2, 7, 4), r(1, 2, 7, 3), r(8, 4)
        mask = torch.randn(1, 7, generator=g, dtype=torch.float64).requires_grad_()
        yield "lowrank", lambda: panther.lowrank_linear(x, A, B, b), (x, A, B, b)
        yield "lowrank, no bias", lambda: panther.lowrank_linear(x, A, B), (x, A, B)
        yield "lowrank, frozen A", lambda: panther.lowrank_linear(x, A.detach(), B, b), (x, B, b)
        yield "sketched", lambda: panther.sketched_linear(x, S1, S2, U1, U2, b), (x, S1, S2, U1, U2, b)
        yield "sketched, no bias", lambda: panther.sketched_linear(x, S1, S2, U1, U2), (x, S1, S2, U1, U2)
        yield "attention", lambda: panther.performer_attention(q, k, v, W), (q, k, v, W)
        relu = dict(kernel_fn="relu", causal=True)
        yield "attention, causal relu", lambda: panther.performer_attention(q, k, v, W, **relu), (q, k, v, W)
        masked = (q, k, v, W, mask)
        yield "attention, float mask", lambda: panther.performer_attention(*masked, scale=0.3), masked

    def gradients():
        out = {}
        for name, call, inputs in cases():
            y = call()
            weights = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)  # a non-uniform upstream gradient
            out[name] = torch.autograd.grad((y * weights).sum(), inputs)
        return out

    def double_backward_error():
        x, A, B, b = next(cases())[2]
        gx, = torch.autograd.grad(panther.lowrank_linear(x, A, B, b).square().sum(), x, create_graph=True)
        gx.sum().backward()
""")


def _namespace() -> dict:
    scope: dict = {}
    exec(CASES, scope)
    return scope


@needs_ext
def test_linear_and_attention_autograd_is_native():
    ops = panther_fx.kernel_info()["ops"]
    for name in NATIVE_AUTOGRAD:
        assert ops[name]["autograd"], f"{name} has no C++ autograd kernel"
    assert not ops["lowrank_conv2d"]["autograd"]  # Python formula: no native kernels to call


@needs_ext
def test_native_autograd_matches_python_formulas(tmp_path):
    """Gradients of every input through the C++ autograd kernels equal those of the Python formulas."""
    script = CASES + textwrap.dedent(f"""
        import panther_fx
        assert panther_fx.kernel_info()["extension"] != "loaded"
        assert not any(panther_fx.kernel_info()["ops"][n]["autograd"] for n in {NATIVE_AUTOGRAD!r})
        torch.save(gradients(), {str(tmp_path / "python.pt")!r})
        try:
            double_backward_error()
        except RuntimeError as e:
            print("ERROR:", e)
    """)
    env = {**os.environ, "PANTHER_NO_EXT": "1"}
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    python = torch.load(tmp_path / "python.pt", weights_only=True)
    native = _namespace()["gradients"]()
    assert native.keys() == python.keys()
    for name, grads in native.items():
        assert len(grads) == len(python[name])
        for g_native, g_python in zip(grads, python[name]):
            torch.testing.assert_close(g_native, g_python, rtol=1e-12, atol=1e-12, msg=name)
    assert "double backward (create_graph=True) is not supported" in run.stdout


@needs_ext
def test_native_double_backward_refused():
    with pytest.raises(RuntimeError, match=r"panther::lowrank_linear: double backward \(create_graph=True\)"):
        _namespace()["double_backward_error"]()


@needs_ext
def test_backward_op_called_with_grad_raises():
    """The backward ops have no derivative: called on inputs that require grad, their result cannot be
    differentiated (the not-implemented fallback), rather than giving a silently wrong gradient."""
    gy, x, A, B = (torch.randn(*s, dtype=torch.float64, requires_grad=True) for s in ((3, 5), (3, 6), (5, 2), (2, 6)))
    gx = panther.lowrank_linear_backward(gy, x, A, B, [True, False, False, False])[0]
    with pytest.raises(RuntimeError, match="not implemented"):
        gx.sum().backward()


@needs_ext
def test_kept_intermediate_compiles_fullgraph_with_eager_gradients():
    """Training through torch.compile traces lowrank_linear_with_t into the forward graph (t is saved for gA);
    fullgraph, no recompile on a second call, and the eager gradients."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.aot_autograd import make_boxed_func

    forward_graphs = []

    def keep_forward(gm, _):
        forward_graphs.append(gm)
        return make_boxed_func(gm.forward)

    backend = aot_autograd(fw_compiler=keep_forward, bw_compiler=lambda gm, _: make_boxed_func(gm.forward))
    g = torch.Generator().manual_seed(1)
    inputs = [torch.randn(*s, generator=g, dtype=torch.float64, requires_grad=True)
              for s in ((4, 3, 6), (5, 2), (2, 6), (5,))]

    def loss(x, A, B, b):
        return panther.lowrank_linear(x, A, B, b).square().sum()

    want = torch.autograd.grad(loss(*inputs), inputs)
    compiled = torch.compile(loss, backend=backend, fullgraph=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(2):
            got = torch.autograd.grad(compiled(*inputs), inputs)
            for g_got, g_want in zip(got, want):
                torch.testing.assert_close(g_got, g_want, rtol=1e-12, atol=1e-12)
    assert len(forward_graphs) == 1
    targets = {n.target for n in forward_graphs[0].graph.nodes if n.op == "call_function"}
    assert torch.ops.panther.lowrank_linear_with_t.default in targets
