"""Performer attention: features, the op (against float64 references), causal/padding semantics, module."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from panther_fx.linalg.features import orthogonal_features, redraw_features_
from panther_fx.nn import RandMultiheadAttention
from panther_fx.ops.attention import (performer_attention, performer_attention_reference,
                                      performer_multi_head_attention)

op = torch.ops.panther.performer_attention
f64 = torch.float64


def _qkv(B=2, H=2, L=40, d=8, dv=6, scale=0.5, seed=0, dtype=f64, S=None):
    g = torch.Generator().manual_seed(seed)
    S = S or L
    q = torch.randn(B, H, L, d, generator=g, dtype=dtype) * scale
    k = torch.randn(B, H, S, d, generator=g, dtype=dtype) * scale
    v = torch.randn(B, H, S, dv, generator=g, dtype=dtype)
    return q, k, v


def _phi(u, W, kernel, root_scale):
    """The DESIGN §3 feature maps without stabilizers (fine in float64 for moderate inputs)."""
    m = W.shape[0]
    if kernel == "relu":
        return torch.relu(u @ W.t()) / math.sqrt(m)
    us = u * root_scale
    return torch.exp(us @ W.t() - 0.5 * (us * us).sum(-1, keepdim=True)) / math.sqrt(m)


def _reference(q, k, v, W, kernel="softmax", causal=False, keep=None):
    """Quadratic-form reference: A = φ(Q)φ(K)ᵀ (lower-triangular if causal, masked keys removed),
    out = A V / A 1."""
    root = q.shape[-1] ** -0.25
    A = _phi(q, W, kernel, root) @ _phi(k, W, kernel, root).transpose(-2, -1)
    if causal:
        A = A.tril()
    if keep is not None:
        A = A * keep[:, None, None, :]
    return (A @ v) / A.sum(-1, keepdim=True)


# ---- features ---------------------------------------------------------------------------------------------
def test_features_orthogonal_blocks_seeded_and_global_rng_untouched():
    state = torch.random.get_rng_state()
    W = orthogonal_features(40, 16, generator=3, dtype=f64)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert W.shape == (40, 16)
    for block in (W[:16], W[16:32]):  # full blocks: mutually orthogonal rows
        unit = block / block.norm(dim=1, keepdim=True)
        torch.testing.assert_close(unit @ unit.t(), torch.eye(16, dtype=f64), atol=1e-12, rtol=0)
    assert torch.equal(W, orthogonal_features(40, 16, generator=3, dtype=f64))
    assert not torch.allclose(W, orthogonal_features(40, 16, generator=4, dtype=f64))
    # chi-distributed row norms: E|w|² = d
    big = orthogonal_features(4096, 16, generator=0, dtype=f64)
    assert abs((big * big).sum(1).mean().item() - 16) < 0.5
    torch.testing.assert_close(orthogonal_features(8, 4, generator=0, scaling="sqrt").norm(dim=1),
                               torch.full((8,), 2.0))


def test_redraw_features_in_place():
    W = orthogonal_features(32, 8, generator=0)
    ptr, before = W.data_ptr(), W.clone()
    redraw_features_(W, generator=1)
    assert W.data_ptr() == ptr and not torch.equal(W, before)
    torch.testing.assert_close(W, orthogonal_features(32, 8, generator=1))


def test_positive_features_unbiased_and_within_favor_variance():
    """Kernel estimates φ(x)ᵀφ(y) over 64 draws: mean → exp(xᵀy), and the mean squared error stays below
    Lemma 2 of Choromanski et al. for i.i.d. features, exp(|x+y|²)·SM²·(1 − exp(−|x+y|²))/m (orthogonal
    features only lower it)."""
    g = torch.Generator().manual_seed(0)
    d, m, draws = 16, 64, 64
    x = torch.randn(6, d, generator=g, dtype=f64) * 0.4
    y = torch.randn(5, d, generator=g, dtype=f64) * 0.4
    exact = torch.exp(x @ y.t())
    est = torch.stack([_phi(x, W, "softmax", 1.0) @ _phi(y, W, "softmax", 1.0).t()
                       for W in (orthogonal_features(m, d, generator=s, dtype=f64) for s in range(draws))])
    s2 = ((x[:, None] + y[None]) ** 2).sum(-1)
    iid_mse = torch.exp(s2) * exact ** 2 * (1 - torch.exp(-s2)) / m
    mse = ((est - exact) ** 2).mean(0)
    assert mse.sum() < iid_mse.sum()
    # the mean of 64 draws is an unbiased estimate: its error is ~ sqrt(mse/64)
    assert ((est.mean(0) - exact).abs() < 4 * (iid_mse / draws).sqrt()).all()


# ---- the op -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kernel", ["softmax", "relu"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_op_matches_float64_reference(kernel, causal, masked):
    q, k, v = _qkv(L=300)  # > one causal chunk (128) and not a multiple of it
    W = orthogonal_features(32, 8, generator=1, dtype=f64)
    mask = keep = None
    if masked:
        mask = torch.zeros(2, 300, dtype=torch.bool)
        mask[1, 250:] = True
        mask[0, 7] = True
        keep = (~mask).to(f64)
    out = performer_attention(q, k, v, W, mask, kernel=kernel, causal=causal)
    torch.testing.assert_close(out, _reference(q, k, v, W, kernel, causal, keep), atol=1e-10, rtol=1e-10)


def test_error_vs_exact_softmax_decreases_with_features():
    """Small logits (|q'|² ≈ 0.36), where the estimator is in its 1/√m regime; for large |q'|² the
    variance factor exp(|q'+k'|²) dominates and many more features are needed (see docs/attention.md)."""
    q, k, v = _qkv(L=64, d=16, scale=0.3)
    exact = F.scaled_dot_product_attention(q, k, v)
    errors = []
    for m in (16, 64, 256, 1024):
        errs = [((performer_attention(q, k, v, orthogonal_features(m, 16, generator=s, dtype=f64)) - exact).norm()
                 / exact.norm()).item() for s in range(4)]
        errors.append(sum(errs) / len(errs))
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < errors[0] / 4, errors  # Monte Carlo rate: 64x features -> ~8x smaller error
    assert errors[-1] < 0.05, errors


def test_causal_output_ignores_future_tokens():
    q, k, v = _qkv(L=300, scale=0.7)
    W = orthogonal_features(32, 8, generator=2, dtype=f64)
    t = 170
    out = performer_attention(q, k, v, W, causal=True)
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    g = torch.Generator().manual_seed(9)
    for x in (q2, k2, v2):
        x[:, :, t + 1:] = torch.randn(x[:, :, t + 1:].shape, generator=g, dtype=f64) * 3
    out2 = performer_attention(q2, k2, v2, W, causal=True)
    torch.testing.assert_close(out2[:, :, :t + 1], out[:, :, :t + 1], atol=1e-12, rtol=1e-12)
    assert not torch.allclose(out2[:, :, t + 1:], out[:, :, t + 1:])


def test_causal_memory_is_linear_in_length():
    """131072 tokens: any L×L intermediate would need 64 GiB (and fail); the chunked path needs a few MiB."""
    L = 2**17
    q, k, v = (t.requires_grad_() for t in _qkv(B=1, H=1, L=L, d=4, dv=4, dtype=torch.float32))
    out = performer_attention(q, k, v, orthogonal_features(8, 4, generator=0), causal=True)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(q.grad).all()
    # the last query sees every key: it equals the non-causal output for that row
    full = performer_attention(q[:, :, -1:], k, v, orthogonal_features(8, 4, generator=0))
    torch.testing.assert_close(out[:, :, -1:], full, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_key_padding_equals_dropping_keys(kind):
    q, k, v = _qkv(L=20, S=50)
    W = orthogonal_features(32, 8, generator=0, dtype=f64)
    lengths = (50, 31)
    pad = torch.arange(50)[None, :] >= torch.tensor(lengths)[:, None]
    mask = pad if kind == "bool" else torch.zeros(2, 50, dtype=f64).masked_fill(pad, float("-inf"))
    out = performer_attention(q, k, v, W, mask)
    for b, n in enumerate(lengths):
        alone = performer_attention(q[b:b + 1], k[b:b + 1, :, :n], v[b:b + 1, :, :n], W)
        torch.testing.assert_close(out[b:b + 1], alone, atol=1e-12, rtol=1e-12)


def test_float_mask_is_an_additive_key_bias():
    """A finite additive key bias b is exact: weights exp(qᵀk/√d + b_s), as in softmax attention."""
    q, k, v = _qkv(L=16, S=24)
    bias = torch.randn(2, 24, dtype=f64, generator=torch.Generator().manual_seed(1))
    W = orthogonal_features(32, 8, generator=0, dtype=f64)
    keep = torch.exp(bias)
    torch.testing.assert_close(performer_attention(q, k, v, W, bias), _reference(q, k, v, W, keep=keep))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_large_norms_do_not_overflow(dtype):
    q, k, v = _qkv(L=200, d=16, scale=30.0, dtype=torch.float32)  # |q·k|/√d ~ 900: exp overflows naively
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    W = orthogonal_features(64, 16, generator=0)
    for causal in (False, True):
        out = performer_attention(q, k, v, W, causal=causal)
        assert out.dtype == dtype and torch.isfinite(out).all()
        ref = performer_attention(q.float(), k.float(), v.float(), W, causal=causal)
        torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("kernel,causal,mask", [("softmax", True, "float"), ("relu", False, "bool"),
                                                ("softmax", False, None)])
def test_gradcheck_float64(kernel, causal, mask):
    q, k, v = (t.requires_grad_() for t in _qkv(B=2, H=1, L=11, d=4, dv=3))
    W = orthogonal_features(6, 4, generator=0, dtype=f64).requires_grad_()
    m = None
    if mask == "bool":
        m = torch.zeros(2, 11, dtype=torch.bool)
        m[1, 8:] = True
    elif mask == "float":
        m = torch.randn(2, 11, dtype=f64, generator=torch.Generator().manual_seed(2)).requires_grad_()
    import panther_fx.ops.attention as attention
    chunk, attention.CAUSAL_CHUNK = attention.CAUSAL_CHUNK, 4  # several chunks plus a ragged tail
    try:
        assert torch.autograd.gradcheck(lambda *a: performer_attention(*a, kernel=kernel, causal=causal),
                                        (q, k, v, W, m))
    finally:
        attention.CAUSAL_CHUNK = chunk


@pytest.mark.parametrize("kernel", ["softmax", "relu"])
def test_explicit_backward_equals_autograd_of_reference(kernel):
    """Long causal sequences (3 chunks + a tail) with padding: the op's hand-written backward against
    autograd through the same math written in differentiable PyTorch."""
    q, k, v = _qkv(L=300, dv=5)
    W = orthogonal_features(24, 8, generator=1, dtype=f64)
    pad = torch.zeros(2, 300, dtype=f64)
    pad[1, 260:] = float("-inf")
    grads = []
    for fn in (performer_attention, performer_attention_reference):
        inputs = [t.clone().requires_grad_() for t in (q, k, v, W)]
        out = fn(*inputs, pad, kernel=kernel, causal=True)
        out.backward(torch.cos(out))
        grads.append([t.grad for t in inputs])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-9)


def test_opcheck():
    """Schema, fake kernel, autograd registration and AOT dispatch (one case: AOT tracing is slow)."""
    q, k, v = (t.requires_grad_() for t in _qkv(B=2, H=1, L=9, d=4, dv=3, dtype=torch.float32))
    W = orthogonal_features(6, 4, generator=0)
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[0, 5:] = True
    torch.library.opcheck(op, (q, k, v, W, mask), {"kernel_fn": "softmax", "causal": True})
    torch.library.opcheck(op, (q, k, v, W), {"kernel_fn": "relu"}, test_utils=("test_schema", "test_faketensor"))


def test_all_keys_padded_gives_zeros_not_nan():
    q, k, v = _qkv(B=1, L=5)
    out = performer_attention(q, k, v, orthogonal_features(8, 8, generator=0, dtype=f64),
                              torch.ones(1, 5, dtype=torch.bool))
    assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("kernel", ["softmax", "relu"])
@pytest.mark.parametrize("causal", [False, True])
def test_no_keys_gives_zeros_in_the_reference_as_in_the_op(kernel, causal):
    """Lk = 0 (causal: L = 0): the reference (the fallback without the extension) raised in amax over no keys
    and, causal, divided by a zero chunk length; the native kernel returns zeros as for fully padded keys."""
    q = torch.randn(1, 2, 0 if causal else 3, 8, dtype=f64, requires_grad=True)
    k = torch.randn(1, 2, 0, 8, dtype=f64, requires_grad=True)
    v = torch.randn(1, 2, 0, 4, dtype=f64, requires_grad=True)
    W = orthogonal_features(16, 8, generator=0, dtype=f64)
    ref = performer_attention_reference(q, k, v, W, kernel=kernel, causal=causal)
    out = performer_attention(q, k, v, W, kernel=kernel, causal=causal)
    assert ref.shape == out.shape == (1, 2, q.shape[2], 4)
    assert torch.equal(ref, torch.zeros_like(ref)) and torch.equal(out, ref)
    grads = torch.autograd.grad(ref.sum(), (q, k, v), allow_unused=True)
    assert all(g is None or not g.any() for g in grads)


def test_op_errors_are_clear():
    q, k, v = _qkv(L=6, S=7)
    W = orthogonal_features(8, 8, generator=0, dtype=f64)
    with pytest.raises(RuntimeError, match="kernel must be one of"):
        performer_attention(q, k, v, W, kernel="cos")
    with pytest.raises(RuntimeError, match="causal attention needs as many queries as keys"):
        performer_attention(q, k, v, W, causal=True)
    with pytest.raises(RuntimeError, match=r"key_padding_mask must be \(B, Lk\)"):
        performer_attention(q, k, v, W, torch.zeros(2, 6, dtype=torch.bool))
    with pytest.raises(RuntimeError, match=r"features must be \(m, 8\)"):
        performer_attention(q, k, v, W[:, :4])


# ---- RandMultiheadAttention ---------------------------------------------------------------------------------
def _mha(batch_first=True, **kw):
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(32, 4, batch_first=batch_first, **kw).eval()
    with torch.no_grad():  # moderate logits, where a few hundred features approximate softmax well
        mha.in_proj_weight.mul_(0.5)
    return mha


def test_from_dense_copies_weights_and_approximates_mha():
    mha = _mha()
    x = torch.randn(2, 24, 32, generator=torch.Generator().manual_seed(1))
    pad = torch.zeros(2, 24, dtype=torch.bool)
    pad[1, 18:] = True
    rand = RandMultiheadAttention.from_dense(mha, num_features=2048, seed=0)
    for name, p in mha.named_parameters():
        assert torch.equal(p, rand.get_parameter(name))
    with torch.no_grad():
        exact = mha(x, x, x, key_padding_mask=pad, need_weights=False)[0]
        out, weights = rand(x, x, x, key_padding_mask=pad)
    assert weights is None
    assert ((out - exact).norm() / exact.norm()).item() < 0.05


def test_batch_first_unbatched_and_functional_agree():
    mha = _mha(batch_first=False)
    seq_first = RandMultiheadAttention.from_dense(mha, num_features=64, seed=5)
    batch_first = RandMultiheadAttention(32, 4, batch_first=True, num_features=64, seed=5)
    batch_first.load_state_dict(seq_first.state_dict())
    x = torch.randn(10, 3, 32)
    with torch.no_grad():
        a = seq_first(x, x, x, is_causal=True)[0]
        b = batch_first(x.transpose(0, 1), x.transpose(0, 1), x.transpose(0, 1), is_causal=True)[0]
        c = seq_first(x[:, 1], x[:, 1], x[:, 1], is_causal=True)[0]
        d = performer_multi_head_attention(x, x, x, 4, mha.in_proj_weight, mha.in_proj_bias, mha.out_proj.weight,
                                           mha.out_proj.bias, seq_first.features, causal=True)
    torch.testing.assert_close(b.transpose(0, 1), a)
    torch.testing.assert_close(c, a[:, 1])
    torch.testing.assert_close(d, a)


def test_an_nn_multihead_attention_state_dict_loads_strictly():
    """The module docstring and docs promise it: the strict load missed the 'features' buffer."""
    mha = torch.nn.MultiheadAttention(16, 2)
    m = RandMultiheadAttention(16, 2, num_features=32, seed=0)
    features = m.features.clone()
    m.load_state_dict(mha.state_dict())
    torch.testing.assert_close(m.in_proj_weight, mha.in_proj_weight)
    assert torch.equal(m.features, features)  # its own features are kept


def test_separate_kdim_vdim_and_cross_attention():
    m = RandMultiheadAttention(16, 2, kdim=12, vdim=20, num_features=32, seed=0)
    assert m.in_proj_weight is None and m.k_proj_weight.shape == (16, 12)
    out, _ = m(torch.randn(5, 2, 16), torch.randn(7, 2, 12), torch.randn(7, 2, 20))
    assert out.shape == (5, 2, 16)


def test_module_errors_and_redraw():
    m = RandMultiheadAttention(16, 2, num_features=32, seed=0)
    x = torch.randn(4, 1, 16)
    with pytest.raises(ValueError, match="need_weights=True is not supported"):
        m(x, x, x, need_weights=True)
    with pytest.raises(ValueError, match="attn_mask cannot be linearized"):
        m(x, x, x, attn_mask=torch.zeros(4, 4))
    with pytest.raises(ValueError, match="add_bias_kv"):
        RandMultiheadAttention.from_dense(torch.nn.MultiheadAttention(16, 2, add_bias_kv=True))
    # shape errors name the shapes, as nn.MultiheadAttention's do (a GEMM or reshape error before)
    for args, message in (((torch.randn(4, 1, 8), x, x), "query has 8 features, expected 16"),
                          ((x, x, torch.randn(3, 1, 16)), "key and value must have the same length"),
                          ((x, torch.randn(4, 2, 16), torch.randn(4, 2, 16)), "the query's batch"),
                          ((x.unsqueeze(0), x, x), "must all be 2-D"),
                          ((x, x[:, 0], x[:, 0]), "must all be 2-D")):
        with pytest.raises(ValueError, match=message):
            m(*args)
    before = m.features.clone()
    m.redraw_features()
    assert not torch.equal(before, m.features)
    m.redraw_features(7)
    torch.testing.assert_close(m.features, orthogonal_features(32, 8, generator=7))
    assert torch.equal(RandMultiheadAttention(16, 2, num_features=32, seed=0).features, before)


def test_seeded_module_from_dense_and_convert_leave_the_global_rng_alone():
    # xavier_uniform_ and out_proj's nn.Linear init used to draw from the global RNG despite the seed
    import panther_fx

    mha = torch.nn.MultiheadAttention(32, 4)
    state = torch.random.get_rng_state()
    a = RandMultiheadAttention(32, 4, num_features=16, seed=3)
    cross = RandMultiheadAttention(32, 4, kdim=12, vdim=20, bias=False, num_features=16, seed=3)
    RandMultiheadAttention.from_dense(mha, num_features=16)
    panther_fx.convert(torch.nn.Sequential(mha), {"rule": [{"match": "0", "op": "attention", "seed": 7}]})
    assert torch.equal(torch.random.get_rng_state(), state)
    b = RandMultiheadAttention(32, 4, num_features=16, seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    # nn.MultiheadAttention's initialisation: Xavier bound √(6 / (E + 3E)), out_proj U(±1/√E), zero biases
    assert a.in_proj_weight.abs().max() <= math.sqrt(6 / 128) and a.in_proj_weight.std() > 0.9 * math.sqrt(2 / 128)
    assert a.out_proj.weight.abs().max() <= 1 / math.sqrt(32) and a.out_proj.weight.std() > 0.9 / math.sqrt(96)
    assert not a.in_proj_bias.any() and not a.out_proj.bias.any()
    assert cross.k_proj_weight.abs().max() <= math.sqrt(6 / 44) and cross.out_proj.bias is None


def test_redraw_after_load_continues_the_original_stream():
    m = RandMultiheadAttention(16, 2, num_features=32, seed=0)
    m.redraw_features()
    loaded = RandMultiheadAttention(16, 2, num_features=32, seed=1)  # a different seed: the state decides
    loaded.load_state_dict(m.state_dict())
    copied = copy.deepcopy(m)
    before = m.features.clone()
    for module in (m, loaded, copied):
        module.redraw_features()
    assert not torch.equal(m.features, before)
    assert torch.equal(loaded.features, m.features) and torch.equal(copied.features, m.features)
    m.redraw_features(7)  # an explicit generator leaves the module's own stream where it was
    for module in (m, loaded):
        module.redraw_features()
    assert torch.equal(loaded.features, m.features)


def test_state_dict_without_the_redraw_stream_still_loads():
    # state dicts saved before the stream was stored: the module keeps its own stream, as it did then
    old = RandMultiheadAttention(16, 2, num_features=32, seed=0).state_dict()
    del old["feature_rng"]
    fresh = RandMultiheadAttention(16, 2, num_features=32, seed=1)
    stream = fresh.feature_rng.clone()
    fresh.load_state_dict(old)
    assert torch.equal(fresh.features, old["features"]) and torch.equal(fresh.feature_rng, stream)


def test_inside_transformer_encoder_layer_no_fast_path_bypass():
    layer = torch.nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, dropout=0.0, batch_first=True).eval()
    layer.self_attn = RandMultiheadAttention.from_dense(layer.self_attn, num_features=64, seed=0)
    calls = []
    layer.self_attn.register_forward_hook(lambda *a: calls.append(1))
    pad = torch.zeros(2, 12, dtype=torch.bool)
    pad[0, 9:] = True
    with torch.no_grad():
        out = layer(torch.randn(2, 12, 32), src_key_padding_mask=pad)
    assert calls and torch.isfinite(out).all()


def test_module_training_dropout_and_compile_fullgraph():
    m = RandMultiheadAttention(16, 2, dropout=0.5, batch_first=True, num_features=32, seed=0).train()
    x = torch.randn(2, 6, 16, requires_grad=True)
    out, _ = m(x, x, x)
    out.sum().backward()
    assert m.in_proj_weight.grad is not None and m.in_proj_weight.grad.abs().sum() > 0
    m.eval()
    compiled = torch.compile(m, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, x, x)[0], m(x, x, x)[0])
