"""Native CPU kernels of panther::performer_attention(_backward) (csrc/cpu/attention_cpu.cpp) against the
pure-PyTorch reference bodies of the ops (panther_fx/ops/attention.py).

Sizes straddle the kernels' internal blocking (256-row blocks for non-causal passes, 64-token causal chunks,
with ragged tails), keys are scaled so that the softmax key stabiliser moves from block to block (the
non-causal kernels track it as a running max), and masks pad whole blocks.
"""

from __future__ import annotations

import itertools

import pytest
import torch

import panther_fx
from panther_fx.linalg.features import orthogonal_features
from panther_fx.ops import attention as attention_ops

panther = torch.ops.panther
NATIVE = panther_fx.kernel_info()["ops"].get("performer_attention", {}).get("cpu", False)
pytestmark = pytest.mark.skipif(not NATIVE, reason="panther_fx._C is not built, disabled (PANTHER_NO_EXT=1) or "
                                                   "lacks the attention kernels")
reference_forward = attention_ops.performer_attention_body
reference_backward = attention_ops.performer_attention_backward_body
ALL = [True] * 5


def native_calls(kernel: str) -> int:
    return panther._native_calls(kernel)


def inputs(layout="contiguous", mask=None, dtype=torch.float32, B=2, H=3, L=300, S=None, d=16, dv=12, m=40, seed=0):
    """q (B, H, L, d), k (B, H, S, d), v (B, H, S, dv), features (m, d), key_padding_mask (B, S) or None.

    Keys after the first block are larger (the key stabiliser grows along the sequence). ``layout``:
    "contiguous"; "heads" = views of (B, L, H, d) tensors (unit last stride, as after a head split);
    "strided" = a non-unit last stride (the kernels copy those).
    """
    S = S or L
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, L, d, generator=g, dtype=torch.float64) * 0.5
    k = torch.randn(B, H, S, d, generator=g, dtype=torch.float64) * 0.5
    v = torch.randn(B, H, S, dv, generator=g, dtype=torch.float64)
    k = k * torch.where(torch.arange(S) < 256, 1.0, 2.5)[:, None]
    if layout == "heads":
        q, k, v = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))
    elif layout == "strided":
        q, k, v = (x.transpose(-1, -2).contiguous().transpose(-1, -2) for x in (q, k, v))
    W = orthogonal_features(m, d, generator=1, dtype=torch.float64)
    if mask == "bool":
        pad = torch.zeros(B, S, dtype=torch.bool)
        pad[1, S // 2:] = True  # the second half of batch 1
        pad[0, :256 if S > 256 else S // 3] = True  # batch 0: the whole first block when there are two
        mask = pad
    elif mask == "float":
        mask = torch.randn(B, S, generator=g, dtype=torch.float64)
        mask[1, S - 40:] = float("-inf")
    tensors = [t.to(dtype) for t in (q, k, v, W)]
    if layout != "contiguous":
        assert not any(t.is_contiguous() for t in tensors[:3])
        assert (tensors[0].stride(-1) == 1) == (layout == "heads")
    return (*tensors, mask.to(dtype) if mask is not None and mask.is_floating_point() else mask)


def assert_rel(actual, expected, tol):
    """Elementwise rtol ``tol`` with an absolute floor of ``tol`` times the largest reference entry."""
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol * expected.abs().max().item())


@pytest.mark.parametrize("kernel,causal,mask,layout", list(itertools.product(
    ["softmax", "relu"], [False, True], [None, "bool", "float"], ["contiguous", "heads", "strided"])))
def test_native_matches_reference_float32(kernel, causal, mask, layout):
    q, k, v, W, pad = inputs(layout, mask)
    kw = dict(kernel_fn=kernel, causal=causal, scale=None)
    before = native_calls("performer_attention.cpu"), native_calls("performer_attention_backward.cpu")
    out = panther.performer_attention(q, k, v, W, pad, **kw)
    assert_rel(out, reference_forward(q, k, v, W, pad, **kw), 1e-5)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(5))
    grads = panther.performer_attention_backward(g, q, k, v, W, pad, kernel, causal, None, ALL)
    expected = reference_backward(g, q, k, v, W, pad, kernel, causal, None, ALL)
    assert native_calls("performer_attention.cpu") == before[0] + 1
    assert native_calls("performer_attention_backward.cpu") == before[1] + 1
    for name, a, b in zip(("q", "k", "v", "features", "mask"), grads, expected):
        if b is None:
            assert a is None, name
        else:
            assert a.dtype == b.dtype and a.shape == b.shape, name
            assert_rel(a, b, 1e-5)


@pytest.fixture
def two_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("causal", [False, True])
def test_autograd_dispatches_native_backward(causal, two_threads):
    """Through autograd: the native forward and backward run and the gradients equal the reference's; g_out
    arrives as a stride-0 expanded tensor from ``sum().backward()``. Two threads, so that (batch, head) pairs
    run on worker threads, which do not inherit the caller's below-autograd dispatch state."""
    q, k, v, W, pad = inputs("heads", "float", L=130)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, W, pad)]
    before = native_calls("performer_attention_backward.cpu")
    panther.performer_attention(*leaves, kernel_fn="softmax", causal=causal).sum().backward()
    assert native_calls("performer_attention_backward.cpu") == before + 1
    g = torch.ones(2, 3, 130, 12)
    expected = reference_backward(g, q, k, v, W, pad, "softmax", causal, None, ALL)
    for leaf, b in zip(leaves, expected):
        assert_rel(leaf.grad, b, 1e-5)


@pytest.mark.parametrize("needs", [[True, False, False, False, False], [False, True, False, False, True],
                                   [False, False, True, False, False], [False, False, False, True, False]])
@pytest.mark.parametrize("causal", [False, True])
def test_backward_computes_only_what_is_needed(needs, causal):
    q, k, v, W, pad = inputs(mask="float", L=70)
    g = torch.randn(2, 3, 70, 12, generator=torch.Generator().manual_seed(1))
    grads = panther.performer_attention_backward(g, q, k, v, W, pad, "relu", causal, 0.3, needs)
    expected = reference_backward(g, q, k, v, W, pad, "relu", causal, 0.3, needs)
    for need, a, b in zip(needs, grads, expected):
        assert (a is None) == (b is None) == (not need)
        if need:
            assert_rel(a, b, 1e-5)


def test_cross_attention_and_explicit_scale():
    q, k, v, W, pad = inputs(mask="bool", L=37, S=300)
    for kernel in ("softmax", "relu"):
        kw = dict(kernel_fn=kernel, causal=False, scale=0.05)
        assert_rel(panther.performer_attention(q, k, v, W, pad, **kw), reference_forward(q, k, v, W, pad, **kw), 1e-5)


def test_float64_matches_reference_to_rounding():
    q, k, v, W, pad = inputs(mask="float", dtype=torch.float64)
    for causal in (False, True):
        kw = dict(kernel_fn="softmax", causal=causal, scale=None)
        assert_rel(panther.performer_attention(q, k, v, W, pad, **kw), reference_forward(q, k, v, W, pad, **kw), 1e-12)
        g = torch.randn(2, 3, 300, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
        for a, b in zip(panther.performer_attention_backward(g, q, k, v, W, pad, "softmax", causal, None, ALL),
                        reference_backward(g, q, k, v, W, pad, "softmax", causal, None, ALL)):
            assert_rel(a, b, 1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precisions_compute_in_float32(dtype):
    """Large norms (|q·k|/√d ~ 900): finite, and equal to the reference up to the final rounding to dtype."""
    q, k, v, W, _ = inputs(L=200, d=16)
    q, k = q * 60, k * 60
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    eps = torch.finfo(dtype).eps
    for causal in (False, True):
        out = panther.performer_attention(q, k, v, W, kernel_fn="softmax", causal=causal)
        assert out.dtype == dtype and torch.isfinite(out).all()
        ref = reference_forward(q, k, v, W, kernel_fn="softmax", causal=causal)
        torch.testing.assert_close(out.float(), ref.float(), rtol=2 * eps, atol=2 * eps * ref.abs().max().item())


def test_all_keys_padded_gives_zero_outputs_and_gradients():
    q, k, v, W, _ = inputs(B=1, L=70)
    pad = torch.ones(1, 70, dtype=torch.bool)
    for causal in (False, True):
        out = panther.performer_attention(q, k, v, W, pad, causal=causal)
        assert torch.equal(out, torch.zeros_like(out))
        grads = panther.performer_attention_backward(torch.ones_like(out), q, k, v, W, pad, "softmax", causal, None,
                                                     ALL)
        assert all(torch.equal(g, torch.zeros_like(g)) for g in grads[:4])


def test_errors_match_the_reference():
    q, k, v, W, _ = inputs(B=2, L=6, S=7)
    with pytest.raises(RuntimeError, match="kernel must be one of"):
        panther.performer_attention(q, k, v, W, kernel_fn="cos")
    with pytest.raises(RuntimeError, match="causal attention needs as many queries as keys"):
        panther.performer_attention(q, k, v, W, causal=True)
    with pytest.raises(RuntimeError, match=r"key_padding_mask must be \(B, Lk\)"):
        panther.performer_attention(q, k, v, W, torch.zeros(2, 6, dtype=torch.bool))
    with pytest.raises(RuntimeError, match=r"features must be \(m, 16\)"):
        panther.performer_attention(q, k, v, W[:, :4])
    for run in (panther.performer_attention, reference_forward):
        with pytest.raises(RuntimeError, match=r"scale must be >= 0 .*, got -1"):
            run(q, k, k[..., :12], W, None, kernel_fn="softmax", causal=False, scale=-1.0)
    for run in (panther.performer_attention, panther._performer_attention_composite, reference_forward):
        args = {"kernel_fn": "softmax", "causal": False}
        if run is panther._performer_attention_composite:
            args["scale"] = None
        with pytest.raises(RuntimeError, match=r"features must be \(m, 16\) with m >= 1, got \[?\(?0, 16"):
            run(q, k, v, W[:0], None, **args)  # the composition divided by m (SIGFPE)
        bad_mask = r"key_padding_mask must be bool .* or floating .*, got (torch\.int64|Long)"
        with pytest.raises(RuntimeError, match=bad_mask):
            run(q, k, k[..., :12], W, torch.ones(2, 7, dtype=torch.long), **args)  # an HF-style 1 = keep mask
        with pytest.raises(RuntimeError, match="q and features must be float16, bfloat16, float32 or float64"):
            run(q.to(torch.float8_e4m3fn), k.to(torch.float8_e4m3fn), v.to(torch.float8_e4m3fn), W, None, **args)


@pytest.mark.cuda
def test_cuda_operands_on_other_devices_are_refused():
    """The row kernels read the mask through a raw pointer: a CPU mask with CUDA q must be an error, not an
    illegal memory access."""
    q, k, v, W, pad = inputs(mask="bool", B=2, L=20)
    q, k, v, W = (t.cuda() for t in (q, k, v, W))
    for run in (panther.performer_attention, reference_forward):
        with pytest.raises(RuntimeError, match="key_padding_mask is on cpu but q is on cuda"):
            run(q, k, v, W, pad, kernel_fn="softmax", causal=False)
        with pytest.raises(RuntimeError, match="features is on cpu but q is on cuda"):
            run(q, k, v, W.cpu(), None, kernel_fn="softmax", causal=False)


def test_opcheck_both_ops():
    q, k, v, W, pad = inputs(mask="float", B=2, H=1, L=9, d=4, dv=3, m=6)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, W, pad)]
    torch.library.opcheck(panther.performer_attention.default, tuple(leaves), {"kernel_fn": "softmax", "causal": True})
    g = torch.randn(2, 1, 9, 3, generator=torch.Generator().manual_seed(3))
    for kernel, causal in (("softmax", True), ("relu", False)):
        torch.library.opcheck(panther.performer_attention_backward.default,
                              (g, q, k, v, W, pad, kernel, causal, None, ALL))


@pytest.mark.parametrize("kernel,mask", list(itertools.product(["softmax", "relu"],
                                                              [None, "bool", "float", "first-part-padded"])))
def test_one_pair_split_across_threads_matches_reference(kernel, mask, two_threads):
    """One (batch, head) pair and two threads: the non-causal kernels split its key blocks (partial states,
    each with its own stabiliser, combined) and its query blocks between the threads. 600 keys = 3 blocks:
    thread 0 takes keys [0, 512), thread 1 [512, 600); "first-part-padded" pads all of thread 0's keys, whose
    empty state must not contribute its stabiliser. Keys grow after token 256, so the parts' maxima differ."""
    q, k, v, W, _ = inputs(B=1, H=1, L=37, S=600)
    pad = None
    if mask in ("bool", "first-part-padded"):
        pad = torch.zeros(1, 600, dtype=torch.bool)
        pad[0, :256 if mask == "bool" else 512] = True
    elif mask == "float":
        pad = torch.randn(1, 600, generator=torch.Generator().manual_seed(7))
        pad[0, 560:] = float("-inf")
    kw = dict(kernel_fn=kernel, causal=False, scale=None)
    before = native_calls("performer_attention.cpu"), native_calls("performer_attention_backward.cpu")
    assert_rel(panther.performer_attention(q, k, v, W, pad, **kw), reference_forward(q, k, v, W, pad, **kw), 1e-5)
    g = torch.randn(1, 1, 37, 12, generator=torch.Generator().manual_seed(6))
    # All gradients, then W alone (the key pass is still needed for the keys' share of ∂W) and q alone.
    for needs in ([True, True, True, True, mask == "float"], [False, False, False, True, False],
                  [True, False, False, False, False]):
        grads = panther.performer_attention_backward(g, q, k, v, W, pad, kernel, False, None, needs)
        expected = reference_backward(g, q, k, v, W, pad, kernel, False, None, needs)
        for a, b in zip(grads, expected):
            assert (a is None) == (b is None)
            if b is not None:
                assert_rel(a, b, 1e-5)
    assert (native_calls("performer_attention.cpu"), native_calls("performer_attention_backward.cpu")) == (
        before[0] + 1, before[1] + 3)


@pytest.mark.parametrize("B,H", [(1, 1), (2, 3)])
def test_inference_mode_with_threads(B, H, two_threads):
    """Under torch.inference_mode() the outputs are inference tensors: the OpenMP workers must run with the
    caller's thread-local state to write them (they raised on both the split and the per-pair paths)."""
    q, k, v, W, _ = inputs(B=B, H=H, L=300)
    pad = torch.zeros(B, 300, dtype=torch.bool)
    pad[-1, 250:] = True
    g = torch.randn(B, H, 300, 12, generator=torch.Generator().manual_seed(1))
    for causal in (False, True):
        expected = panther.performer_attention(q, k, v, W, pad, causal=causal)
        grads = panther.performer_attention_backward(g, q, k, v, W, pad, "softmax", causal, None, ALL)
        with torch.inference_mode():
            torch.testing.assert_close(panther.performer_attention(q, k, v, W, pad, causal=causal), expected,
                                       rtol=0, atol=0)
            again = panther.performer_attention_backward(g, q, k, v, W, pad, "softmax", causal, None, ALL)
        for a, b in zip(again, grads):
            assert (a is None) == (b is None) and (a is None or torch.equal(a, b))


def test_split_path_propagates_nan(two_threads):
    """A NaN key makes its thread's partial state NaN; that part must be summed (the output is NaN, as in the
    reference), not dropped as if all its keys were padded."""
    q, k, v, W, _ = inputs(B=1, H=1, L=37, S=600)
    k[0, 0, 400, 3] = float("nan")
    assert torch.isnan(reference_forward(q, k, v, W, None, kernel_fn="softmax", causal=False)).all()
    assert torch.isnan(panther.performer_attention(q, k, v, W)).all()


def test_causal_running_state_keeps_float32_precision_at_long_sequences():
    """The causal prefix (and the backward's suffix) state summed over 128 chunks of 64 tokens: kept in
    float32 it drifted to 3e-6 (forward) and 1e-5 (gradients) of the float64 result at 8192 tokens, 4–10× the
    reference's error; summed in double it is within 1.5e-6, like the reference."""
    g = torch.Generator().manual_seed(0)
    L = 8192
    q, k = torch.randn(1, 1, L, 16, generator=g), 2 * torch.randn(1, 1, L, 16, generator=g)
    v, W = torch.randn(1, 1, L, 8, generator=g), torch.randn(64, 16, generator=g)
    pad, g_out = 5 * torch.randn(1, L, generator=g), torch.randn(1, 1, L, 8, generator=g)
    exact = [t.double() for t in (q, k, v, W, pad)]
    assert_rel(panther.performer_attention(q, k, v, W, pad, causal=True).double(),
               reference_forward(*exact, kernel_fn="softmax", causal=True), 1.5e-6)
    grads = panther.performer_attention_backward(g_out, q, k, v, W, pad, "softmax", True, None, ALL)
    expected = reference_backward(g_out.double(), *exact, "softmax", True, None, ALL)
    for a, b in zip(grads, expected):
        assert_rel(a.double(), b, 1.5e-6)
