"""The batched FAVOR+ composition that the CUDA kernels of panther::performer_attention(_backward) run
(csrc/attention.cpp), against the pure-PyTorch reference bodies (panther_fx/ops/attention.py).

On the CPU the composition is reached through its private ops ``panther::_performer_attention_composite`` and
``_performer_attention_backward_composite`` with its ATen row kernels; on CUDA (``cuda`` marker, skipped
without a GPU or without the CUDA build) through the public ops, with the fused CUDA row kernels and, for
bfloat16 inputs, bfloat16 GEMM operands.
"""

from __future__ import annotations

import itertools

import pytest
import torch

import panther_fx
from panther_fx.linalg.features import orthogonal_features
from panther_fx.ops import attention as attention_ops

from test_attention_kernels import ALL, assert_rel, inputs

panther = torch.ops.panther
OPS = panther_fx.kernel_info()["ops"]
BUILT = torch._C._dispatch_has_kernel("panther::_performer_attention_composite")
pytestmark = pytest.mark.skipif(not BUILT, reason="panther_fx._C is not built or disabled (PANTHER_NO_EXT=1)")
reference_forward = attention_ops.performer_attention_body
reference_backward = attention_ops.performer_attention_backward_body
NAMES = ("q", "k", "v", "features", "mask")


def composite(q, k, v, W, pad, kernel_fn="softmax", causal=False, scale=None):
    return panther._performer_attention_composite(q, k, v, W, pad, kernel_fn, causal, scale)


def composite_backward(g, q, k, v, W, pad, kernel, causal, scale, needs):
    return panther._performer_attention_backward_composite(g, q, k, v, W, pad, kernel, causal, scale, needs)


def assert_grads(actual, expected, tol):
    for name, a, b in zip(NAMES, actual, expected):
        if b is None:
            assert a is None, name
        else:
            assert a is not None and a.dtype == b.dtype and a.shape == b.shape, name
            assert_rel(a, b, tol)


# ---- CPU: the composition's math ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kernel,causal,mask,layout", list(itertools.product(
    ["softmax", "relu"], [False, True], [None, "bool", "float"], ["contiguous", "strided"])))
def test_composite_matches_reference_float32(kernel, causal, mask, layout):
    """L = 300: two full causal chunks of 128 and a ragged one; keys grow after token 256."""
    q, k, v, W, pad = inputs(layout, mask)
    out = composite(q, k, v, W, pad, kernel, causal)
    assert_rel(out, reference_forward(q, k, v, W, pad, kernel_fn=kernel, causal=causal), 1e-5)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(5))
    assert_grads(composite_backward(g, q, k, v, W, pad, kernel, causal, None, ALL),
                 reference_backward(g, q, k, v, W, pad, kernel, causal, None, ALL), 1e-5)


@pytest.mark.parametrize("kernel", ["softmax", "relu"])
def test_composite_float64_matches_reference_to_rounding(kernel):
    q, k, v, W, pad = inputs(mask="float", dtype=torch.float64)
    for causal in (False, True):
        out = composite(q, k, v, W, pad, kernel, causal, 0.2)
        assert_rel(out, reference_forward(q, k, v, W, pad, kernel_fn=kernel, causal=causal, scale=0.2), 1e-12)
        g = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
        assert_grads(composite_backward(g, q, k, v, W, pad, kernel, causal, 0.2, ALL),
                     reference_backward(g, q, k, v, W, pad, kernel, causal, 0.2, ALL), 1e-12)


def test_composite_cross_attention_and_subsets_of_gradients():
    q, k, v, W, pad = inputs(mask="float", L=37, S=300)
    g = torch.randn(2, 3, 37, 12, generator=torch.Generator().manual_seed(1))
    for needs in ([True, False, False, False, False], [False, True, False, False, True],
                  [False, False, True, False, False], [False, False, False, True, False]):
        for kernel in ("softmax", "relu"):
            assert_grads(composite_backward(g, q, k, v, W, pad, kernel, False, None, needs),
                         reference_backward(g, q, k, v, W, pad, kernel, False, None, needs), 1e-5)


def test_composite_all_keys_padded_and_empty_sequences():
    q, k, v, W, _ = inputs(B=1, L=70)
    pad = torch.ones(1, 70, dtype=torch.bool)
    for causal in (False, True):
        out = composite(q, k, v, W, pad, "softmax", causal)
        assert torch.equal(out, torch.zeros_like(out))
        grads = composite_backward(torch.ones_like(out), q, k, v, W, pad, "softmax", causal, None, ALL)
        assert all(torch.equal(g, torch.zeros_like(g)) for g in grads[:4])
    empty = composite(q, k[:, :, :0], v[:, :, :0], W, None)
    assert empty.shape == (1, 3, 70, 12) and not empty.any()


@pytest.mark.parametrize("causal", [False, True])
def test_composite_bfloat16_operands_stay_within_a_few_roundings(causal):
    """bfloat16 inputs keep bfloat16 GEMM operands (features and states rounded to bfloat16, float32
    accumulation; on the CPU the operands are widened, which gives the same numbers): outputs and gradients
    within 4 eps (of the largest entry) of the float64 reference on the bfloat16 inputs; measured 0.2-1.8 %
    against the 3.1 % bound. Large norms (|q·k|/√d ~ 900, where a bfloat16 copy of the features alone
    moved the output by 0.24 of 2.9) stay finite and within the bound: the features enter as hi + lo halves.
    The gradients are checked at moderate norms only: at large norms the causal float32 path itself is 20-75 %
    off float64 (the head-wide key stabiliser underflows the early keys' features), in the reference too."""
    eps = torch.finfo(torch.bfloat16).eps
    for norm in (1, 60):
        q, k, v, W, pad = inputs(mask="bool", L=300, d=16)
        q, k, v = (q * norm).bfloat16(), (k * norm).bfloat16(), v.bfloat16()
        out = composite(q, k, v, W, pad, "softmax", causal)
        assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
        args64 = (q.double(), k.double(), v.double(), W.double(), pad)
        assert_rel(out.double(), reference_forward(*args64, kernel_fn="softmax", causal=causal), 4 * eps)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(4)).bfloat16()
    q, k, v, W, pad = inputs(mask="bool", L=300, d=16)
    q, k, v = q.bfloat16(), k.bfloat16(), v.bfloat16()
    grads = composite_backward(g, q, k, v, W, pad, "softmax", causal, None, ALL)
    expected = reference_backward(g.double(), q.double(), k.double(), v.double(), W.double(), pad, "softmax", causal,
                                  None, ALL)
    for name, a, b in zip(NAMES[:4], grads, expected):
        assert a.dtype == (torch.bfloat16 if name != "features" else torch.float32), name
        assert_rel(a.double(), b, 4 * eps)


def test_composite_checks_like_the_reference():
    q, k, v, W, _ = inputs(B=2, L=6, S=7)
    with pytest.raises(RuntimeError, match="causal attention needs as many queries as keys"):
        composite(q, k, v, W, None, "softmax", True)
    with pytest.raises(RuntimeError, match="kernel must be one of"):
        composite(q, k, v, W, None, "cos")


@pytest.mark.parametrize("body", ["composite", "reference"])
def test_causal_prefix_keeps_float32_precision_when_one_chunk_dominates(body):
    """Keys of norm ~16 make some chunk's state dwarf the chunks before it. The exclusive prefix across chunks
    was formed as cumsum − state, which cancels there: against float64 the forward was 1e-4 and the v gradient
    1e-2 off (relative to the largest entry); the shifted cumsum is within 5e-6, as the sequential CPU kernel."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 1000, 64, generator=g) * 2 for _ in range(3))
    W = orthogonal_features(256, 64, generator=0)
    pad = torch.zeros(2, 1000, dtype=torch.bool)
    pad[1, 700:] = True
    g_out = torch.randn(2, 4, 1000, 64, generator=g)
    exact = [t.double() for t in (q, k, v, W)]
    if body == "composite":
        out = composite(q, k, v, W, pad, "softmax", True)
        grads = composite_backward(g_out, q, k, v, W, pad, "softmax", True, None, ALL)
    else:
        out = reference_forward(q, k, v, W, pad, kernel_fn="softmax", causal=True)
        grads = reference_backward(g_out, q, k, v, W, pad, "softmax", True, None, ALL)
    assert_rel(out.double(), reference_forward(*exact, pad, kernel_fn="softmax", causal=True), 2e-5)
    expected = reference_backward(g_out.double(), *exact, pad, "softmax", True, None, ALL)
    for name, a, b in zip(NAMES[:4], grads, expected):
        assert_rel(a.double(), b, 2e-5)


# ---- CUDA: the registered kernels -----------------------------------------------------------------------------
needs_cuda_kernels = pytest.mark.skipif(not OPS.get("performer_attention", {}).get("cuda", False),
                                        reason="CUDA kernels not built (needs a CUDA toolkit at install time, or PANTHER_CUDA=1)")


def to_cuda(tensors):
    return [t.cuda() if isinstance(t, torch.Tensor) else t for t in tensors]


@pytest.mark.cuda
@needs_cuda_kernels
@pytest.mark.parametrize("kernel,causal,mask", list(itertools.product(
    ["softmax", "relu"], [False, True], [None, "bool", "float"])))
def test_cuda_float32_matches_float64_reference(kernel, causal, mask):
    """float32 on CUDA (cuBLAS in float32, no TF32 by default) against the float64 reference body."""
    assert not torch.backends.cuda.matmul.allow_tf32
    q, k, v, W, pad = inputs("heads", mask)
    q64, k64, v64, W64 = (t.double() for t in (q, k, v, W))
    pad64 = pad.double() if pad is not None and pad.is_floating_point() else pad
    cq, ck, cv, cW, cpad = to_cuda([q, k, v, W, pad])
    before = panther._native_calls("performer_attention.cuda"), panther._native_calls("performer_attention_backward.cuda")
    out = panther.performer_attention(cq, ck, cv, cW, cpad, kernel_fn=kernel, causal=causal)
    assert out.device.type == "cuda" and out.dtype == torch.float32
    assert_rel(out.cpu().double(), reference_forward(q64, k64, v64, W64, pad64, kernel_fn=kernel, causal=causal), 1e-5)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(5))
    grads = panther.performer_attention_backward(g.cuda(), cq, ck, cv, cW, cpad, kernel, causal, None, ALL)
    expected = reference_backward(g.double(), q64, k64, v64, W64, pad64, kernel, causal, None, ALL)
    assert_grads([None if a is None else a.cpu().double() for a in grads], expected, 1e-5)
    assert panther._native_calls("performer_attention.cuda") == before[0] + 1
    assert panther._native_calls("performer_attention_backward.cuda") == before[1] + 1


@pytest.mark.cuda
@needs_cuda_kernels
@pytest.mark.parametrize("kernel", ["softmax", "relu"])
def test_cuda_float64_matches_reference_to_rounding(kernel):
    """The double instantiations of the CUDA row kernels, as the CPU composition test above."""
    q, k, v, W, pad = inputs(mask="float", dtype=torch.float64)
    for causal in (False, True):
        out = panther.performer_attention(*to_cuda([q, k, v, W, pad]), kernel_fn=kernel, causal=causal, scale=0.2)
        assert out.dtype == torch.float64
        assert_rel(out.cpu(), reference_forward(q, k, v, W, pad, kernel_fn=kernel, causal=causal, scale=0.2), 1e-12)
        g = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
        grads = panther.performer_attention_backward(g.cuda(), *to_cuda([q, k, v, W, pad]), kernel, causal, 0.2, ALL)
        assert_grads([None if a is None else a.cpu() for a in grads],
                     reference_backward(g, q, k, v, W, pad, kernel, causal, 0.2, ALL), 1e-12)


@pytest.mark.cuda
@needs_cuda_kernels
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal", [False, True])
def test_cuda_half_precisions_finite_and_close(dtype, causal):
    """Large norms (|q·k|/√d ~ 900) stay finite; bfloat16 GEMM operands (features and states rounded to
    bfloat16, float32 accumulation) and float16's float32 path keep the output within a few roundings of
    dtype of the float64 reference."""
    q, k, v, W, pad = inputs(mask="bool", L=200, d=16)
    q, k = q * 60, k * 60
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    out = panther.performer_attention(*to_cuda([q, k, v, W, pad]), kernel_fn="softmax", causal=causal)
    assert out.dtype == dtype and torch.isfinite(out).all()
    ref = reference_forward(q.double(), k.double(), v.double(), W.double(), pad, kernel_fn="softmax", causal=causal)
    assert_rel(out.cpu().double(), ref, 4 * torch.finfo(dtype).eps)
    q, k, v, W, pad = inputs(mask="bool", L=200, d=16)  # gradients at moderate norms (see the CPU test above)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(4)).to(dtype)
    grads = panther.performer_attention_backward(g.cuda(), *to_cuda([q, k, v, W, pad]), "softmax", causal, None, ALL)
    expected = reference_backward(g.double(), q.double(), k.double(), v.double(), W.double(), pad, "softmax", causal,
                                  None, ALL)
    for a, b in zip(grads[:4], expected):
        assert_rel(a.cpu().double(), b, 4 * torch.finfo(dtype).eps)


@pytest.mark.cuda
@needs_cuda_kernels
def test_cuda_autograd_opcheck_and_current_stream():
    q, k, v, W, pad = to_cuda(inputs(mask="float", B=2, H=1, L=9, d=4, dv=3, m=6))
    leaves = [t.clone().requires_grad_() for t in (q, k, v, W, pad)]
    torch.library.opcheck(panther.performer_attention.default, tuple(leaves), {"kernel_fn": "softmax", "causal": True})
    g = torch.randn(2, 1, 9, 3, device="cuda")
    torch.library.opcheck(panther.performer_attention_backward.default,
                          (g, q, k, v, W, pad, "relu", False, None, ALL))
    expected = panther.performer_attention(q, k, v, W, pad, kernel_fn="softmax", causal=True)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        out = panther.performer_attention(q, k, v, W, pad, kernel_fn="softmax", causal=True)
    stream.synchronize()
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
