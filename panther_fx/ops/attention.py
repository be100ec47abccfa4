"""Performer (FAVOR+) attention as the custom op ``torch.ops.panther.performer_attention``.

For queries Q (B, H, Lq, d), keys K (B, H, Lk, d), values V (B, H, Lk, dv) and a feature matrix W (m, d):

- softmax kernel (positive random features), with u' = u·√scale (scale defaults to 1/√d, so q'ᵀk' = qᵀk/√d):
  φ(u) = exp(W u' − |u'|²/2 − c)/√m, an unbiased estimate of exp(q'ᵀk') = φ(q)ᵀφ(k)·e^{c_q + c_k};
- relu kernel: φ(u) = relu(W u)/√m;
- out = φ(Q)(φ(K)ᵀV) / (φ(Q)Σ_s φ(K_s)); causal: the sums run over s ≤ t only.

Numerics: the stabilizer c is the row max over features for queries and the max over keys and features
for keys (detached; a per-query or per-sequence constant cancels between numerator and denominator), so the
largest feature is 1/√m and exp never overflows. Everything is computed in float32 (float64 stays
float64) whatever the input dtype, and the output is cast back. The denominator is clamped at ``EPS`` so
rows with no admissible key (all keys padded) give 0 instead of NaN.

Key padding: ``key_padding_mask`` (B, Lk) is bool (True = ignore that key, as in ``nn.MultiheadAttention``)
or float (added to the attention logits, e.g. 0 / −inf). A float bias b_s multiplies φ(K_s) by e^{b_s},
which is exactly softmax attention with that additive key bias; −inf (or a very negative value) drops it.

Causal mode processes chunks of ``CAUSAL_CHUNK`` tokens: inside a chunk a masked C×C product of features,
across chunks an exclusive prefix sum of the per-chunk states φ(K)ᵀ[V, 1] (m, dv+1). Memory is linear in L
(L/C states of m·(dv+1) floats, plus the C×C blocks) and there is no per-token Python loop.

The backward pass is the op ``panther::performer_attention_backward`` (so that native kernels can be registered
for it too): explicit (no recomputation through autograd), with the same chunked products, so it is linear in L
as well; the features are recomputed from the saved inputs rather than stored.

``panther_fx._C`` registers fused CPU kernels for both ops (csrc/cpu/attention_cpu.cpp) and, in a CUDA build,
CUDA kernels (csrc/cuda/attention_cuda.cu: batched GEMMs with fused row kernels, bfloat16 GEMM operands for
bfloat16 inputs, see docs/attention.md); the Python bodies here are their reference and the fallback
elsewhere.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ._autocast import autocast_to_lower_precision
from ._library import check_no_double_backward, define_op, register_autograd

__all__ = ["performer_attention", "performer_attention_op", "performer_attention_backward",
           "performer_attention_body", "performer_attention_backward_body", "performer_attention_reference",
           "performer_multi_head_attention", "causal_product", "anticausal_product", "CAUSAL_CHUNK", "EPS", "KERNELS"]

KERNELS = ("softmax", "relu")
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
CAUSAL_CHUNK = 128
"""Tokens per chunk of the causal prefix sums: C×C blocks against L/C states of m·(dv+1) floats."""
EPS = 1e-30
"""Denominator floor (in the float32 accumulation): only rows with no admissible key ever reach it."""


# ---- checks --------------------------------------------------------------------------------------------
def _check(q: Tensor, k: Tensor, v: Tensor, features: Tensor, key_padding_mask: Optional[Tensor], kernel: str,
           causal: bool, scale: Optional[float]) -> None:
    name = "performer_attention"
    torch._check(scale is None or scale >= 0,
                 lambda: f"{name}: scale must be >= 0 (the logits are scale·q·k), got {scale}")
    torch._check(kernel in KERNELS, lambda: f"{name}: kernel must be one of {KERNELS}, got {kernel!r}")
    torch._check(q.dim() == 4 and k.dim() == 4 and v.dim() == 4,
                 lambda: f"{name}: q, k, v must be (B, H, L, d), got {q.dim()}-D, {k.dim()}-D, {v.dim()}-D")
    torch._check(q.shape[:2] == k.shape[:2] == v.shape[:2],
                 lambda: f"{name}: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} disagree on (B, H)")
    torch._check(k.shape[2] == v.shape[2],
                 lambda: f"{name}: k has {k.shape[2]} tokens but v has {v.shape[2]}")
    torch._check(q.shape[3] == k.shape[3],
                 lambda: f"{name}: q head dim {q.shape[3]} differs from k head dim {k.shape[3]}")
    torch._check(features.dim() == 2 and features.shape[1] == q.shape[3] and features.shape[0] > 0,
                 lambda: f"{name}: features must be (m, {q.shape[3]}) with m >= 1, got {tuple(features.shape)}")
    torch._check(q.dtype == k.dtype == v.dtype,
                 lambda: f"{name}: dtypes differ: q {q.dtype}, k {k.dtype}, v {v.dtype}")
    torch._check(q.dtype in _DTYPES and features.dtype in _DTYPES,
                 lambda: f"{name}: q and features must be float16, bfloat16, float32 or float64, "
                         f"got {q.dtype}, {features.dtype}")
    for other, t in (("k", k), ("v", v), ("features", features), ("key_padding_mask", key_padding_mask)):
        torch._check(t is None or t.device == q.device,
                     lambda other=other, t=t: f"{name}: {other} is on {t.device} but q is on {q.device}")
    if causal:
        torch._check(q.shape[2] == k.shape[2],
                     lambda: f"{name}: causal attention needs as many queries as keys, "
                             f"got {q.shape[2]} and {k.shape[2]}")
    if key_padding_mask is not None:
        torch._check(key_padding_mask.shape == (k.shape[0], k.shape[2]),
                     lambda: f"{name}: key_padding_mask must be (B, Lk) = ({k.shape[0]}, {k.shape[2]}), "
                             f"got {tuple(key_padding_mask.shape)}")
        torch._check(key_padding_mask.dtype == torch.bool or key_padding_mask.dtype in _DTYPES,
                     lambda: f"{name}: key_padding_mask must be bool (True = ignore the key) or floating (added "
                             f"to the logits), got {key_padding_mask.dtype}")


def _work_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _key_bias(key_padding_mask: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    """The additive key bias b (B, 1, Lk, 1): 0 / −inf for a bool mask, the values of a float mask."""
    if key_padding_mask is None:
        return None
    if key_padding_mask.dtype == torch.bool:
        bias = torch.zeros(key_padding_mask.shape, dtype=dtype, device=key_padding_mask.device)
        bias = bias.masked_fill(key_padding_mask, float("-inf"))
    else:
        bias = key_padding_mask.to(dtype)
    return bias[:, None, :, None]


# ---- feature maps ----------------------------------------------------------------------------------------
def _softmax_logits(u: Tensor, W: Tensor, root_scale: float) -> tuple[Tensor, Tensor]:
    """u' = u·√scale and the exponent W u' − |u'|²/2 (..., L, m)."""
    us = u * root_scale
    return us, us @ W.t() - 0.5 * (us * us).sum(-1, keepdim=True)


def _feature_map(u: Tensor, W: Tensor, kernel: str, root_scale: float, *, is_query: bool,
                 bias: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """φ(u) (B, H, L, m) and u' (what the backward needs), in the work dtype.

    Keys carry the additive bias inside the exponent (softmax) or as a factor e^b (relu).
    """
    m = W.shape[0]
    inv_root_m = 1.0 / math.sqrt(m)
    if kernel == "relu":
        phi = torch.relu(u @ W.t()) * inv_root_m
        if bias is not None:
            phi = phi * torch.exp(bias)
        return phi, u
    us, logits = _softmax_logits(u, W, root_scale)
    if bias is not None:
        logits = logits + bias
    with torch.no_grad():
        if is_query:
            stab = logits.amax(dim=-1, keepdim=True)
        elif logits.shape[-2]:
            stab = logits.amax(dim=(-2, -1), keepdim=True)
        else:  # no keys: amax of nothing raises; the output is 0, as for fully padded keys
            stab = logits.new_zeros(*logits.shape[:-2], 1, 1)
        # All keys padded: the max is −inf; any finite stabilizer leaves φ = 0 there.
        stab = torch.where(torch.isfinite(stab), stab, torch.zeros_like(stab))
    return torch.exp(logits - stab) * inv_root_m, us


def _feature_map_backward(g_phi: Tensor, phi: Tensor, u_work: Tensor, W: Tensor, kernel: str, root_scale: float,
                          bias: Optional[Tensor], need_u: bool, need_W: bool
                          ) -> tuple[Optional[Tensor], Optional[Tensor], Tensor]:
    """Gradients of φ w.r.t. u, W and the additive key bias b, given g_phi = ∂loss/∂φ.

    softmax: ∂φ_j/∂u' = φ_j (w_j − u'); relu: ∂φ_j/∂u = 1[w_jᵀu > 0] w_j e^b/√m; both: ∂φ_j/∂b = φ_j.
    """
    g_bias = (g_phi * phi).sum(-1)
    if kernel == "relu":
        factor = (u_work @ W.t() > 0).to(phi.dtype) / math.sqrt(W.shape[0])
        if bias is not None:
            factor = factor * torch.exp(bias)
        g_pre = g_phi * factor
        g_u = g_pre @ W if need_u else None
        g_W = _outer_sum(g_pre, u_work) if need_W else None
        return g_u, g_W, g_bias
    gp = g_phi * phi
    g_u = (gp @ W - g_bias.unsqueeze(-1) * u_work) * root_scale if need_u else None
    g_W = _outer_sum(gp, u_work) if need_W else None
    return g_u, g_W, g_bias


def _outer_sum(a: Tensor, b: Tensor) -> Tensor:
    """Σ over batch, heads and tokens of a_tᵀ b_t: (..., L, m), (..., L, d) -> (m, d)."""
    return a.reshape(-1, a.shape[-1]).t() @ b.reshape(-1, b.shape[-1])


# ---- products --------------------------------------------------------------------------------------------
def causal_product(a: Tensor, b: Tensor, c: Tensor, chunk: Optional[int] = None) -> Tensor:
    """out_t = Σ_{s ≤ t} (a_t · b_s) c_s for a (..., L, p), b (..., L, p), c (..., L, r) -> (..., L, r).

    Chunked: a masked C×C block inside each chunk plus an exclusive prefix sum of the per-chunk states
    b_chunkᵀ c_chunk (p, r) across chunks. Memory O(L/C · p · r + L · C); no loop over tokens.
    """
    L = a.shape[-2]
    C = max(1, min(chunk or CAUSAL_CHUNK, L))  # at least 1: an empty sequence has no chunks
    n = -(-L // C)
    pad = n * C - L
    if pad:
        # Zero tokens at the end contribute nothing to later sums and their outputs are cut off.
        a, b, c = (torch.nn.functional.pad(t, (0, 0, 0, pad)) for t in (a, b, c))
    lead = a.shape[:-2]
    a = a.reshape(*lead, n, C, a.shape[-1])
    b = b.reshape(*lead, n, C, b.shape[-1])
    c = c.reshape(*lead, n, C, c.shape[-1])
    scores = (a @ b.transpose(-2, -1)).tril()  # (..., n, C, C): s ≤ t inside a chunk
    out = scores @ c
    state = b.transpose(-2, -1) @ c  # (..., n, p, r)
    # Exclusive (the chunks strictly before) as a shifted inclusive sum: cumsum − state would cancel
    # catastrophically when one chunk's state dwarfs the earlier ones.
    prefix = torch.cat((torch.zeros_like(state[..., :1, :, :]), state[..., :-1, :, :].cumsum(dim=-3)), dim=-3)
    out = out + a @ prefix
    return out.reshape(*lead, n * C, out.shape[-1])[..., :L, :]


def anticausal_product(a: Tensor, b: Tensor, c: Tensor, chunk: Optional[int] = None) -> Tensor:
    """out_s = Σ_{t ≥ s} (a_s · b_t) c_t: :func:`causal_product` on the time-reversed sequences."""
    flip = lambda t: t.flip(-2)  # noqa: E731
    return flip(causal_product(flip(a), flip(b), flip(c), chunk))


def _augment(v: Tensor) -> Tensor:
    """[V, 1] (..., L, dv+1): one product gives numerator and denominator."""
    return torch.cat([v, v.new_ones(*v.shape[:-1], 1)], dim=-1)


def _forward_parts(q, k, v, features, key_padding_mask, kernel, causal, scale):
    dtype = _work_dtype(q)
    d = q.shape[-1]
    root_scale = math.sqrt(scale if scale is not None else 1.0 / math.sqrt(d))
    W = features.to(dtype)
    bias = _key_bias(key_padding_mask, dtype)
    qw, kw, vw = q.to(dtype), k.to(dtype), v.to(dtype)
    phi_q, q_work = _feature_map(qw, W, kernel, root_scale, is_query=True, bias=None)
    phi_k, k_work = _feature_map(kw, W, kernel, root_scale, is_query=False, bias=bias)
    v1 = _augment(vw)
    if causal:
        numden = causal_product(phi_q, phi_k, v1)
    else:
        numden = phi_q @ (phi_k.transpose(-2, -1) @ v1)
    num, den = numden[..., :-1], numden[..., -1:]
    den_c = den.clamp_min(EPS)
    return num / den_c, den, den_c, phi_q, q_work, phi_k, k_work, v1, W, root_scale, bias


def performer_attention_reference(q: Tensor, k: Tensor, v: Tensor, features: Tensor,
                                  key_padding_mask: Optional[Tensor] = None, *, kernel: str = "softmax",
                                  causal: bool = False, scale: Optional[float] = None) -> Tensor:
    """The op's math in plain differentiable PyTorch (same feature maps, same chunked products)."""
    _check(q, k, v, features, key_padding_mask, kernel, causal, scale)
    return _forward_parts(q, k, v, features, key_padding_mask, kernel, causal, scale)[0].to(q.dtype)


# ---- the op ----------------------------------------------------------------------------------------------
# The schema calls the kernel argument ``kernel_fn``: Inductor's FallbackKernel.create(kernel, ...) takes
# ``kernel`` as its own first parameter, so a custom op keyword named ``kernel`` cannot be lowered.
def performer_attention_body(q: Tensor, k: Tensor, v: Tensor, features: Tensor,
                             key_padding_mask: Optional[Tensor] = None, *, kernel_fn: str = "softmax",
                             causal: bool = False, scale: Optional[float] = None) -> Tensor:
    """The Python body of ``torch.ops.panther.performer_attention``; see :func:`performer_attention`."""
    _check(q, k, v, features, key_padding_mask, kernel_fn, causal, scale)
    with torch.no_grad():
        return _forward_parts(q, k, v, features, key_padding_mask, kernel_fn, causal, scale)[0].to(q.dtype)


def performer_attention(q: Tensor, k: Tensor, v: Tensor, features: Tensor, key_padding_mask: Optional[Tensor] = None,
                        *, kernel: str = "softmax", causal: bool = False, scale: Optional[float] = None) -> Tensor:
    """FAVOR+ attention: q (B, H, Lq, d), k (B, H, Lk, d), v (B, H, Lk, dv), features (m, d),
    key_padding_mask (B, Lk) bool (True = ignore) or float (additive) -> (B, H, Lq, dv) in q's dtype.

    out = φ(Q)(φ(K)ᵀV) / (φ(Q)Σφ(K)), causal over prefixes when ``causal``; ``kernel`` is "softmax" or
    "relu"; ``scale`` defaults to 1/√d. Calls ``torch.ops.panther.performer_attention`` (whose schema names
    the kernel argument ``kernel_fn``); see the module docstring for the numerics.
    """
    return torch.ops.panther.performer_attention(q, k, v, features, key_padding_mask, kernel_fn=kernel,
                                                 causal=causal, scale=scale)


def _fake(q, k, v, features, key_padding_mask=None, *, kernel_fn="softmax", causal=False, scale=None):
    _check(q, k, v, features, key_padding_mask, kernel_fn, causal, scale)
    return q.new_empty((*q.shape[:3], v.shape[3]))


performer_attention_op = define_op(
    "performer_attention(Tensor q, Tensor k, Tensor v, Tensor features, Tensor? key_padding_mask=None, *, "
    "str kernel_fn=\"softmax\", bool causal=False, float? scale=None) -> Tensor", performer_attention_body, _fake)


def _setup(ctx, inputs, keyword_only_inputs, output):
    q, k, v, features, key_padding_mask = (tuple(inputs) + (None,))[:5]
    ctx.kernel = keyword_only_inputs.get("kernel_fn", "softmax")
    ctx.causal = keyword_only_inputs.get("causal", False)
    ctx.scale = keyword_only_inputs.get("scale", None)
    ctx.save_for_backward(q, k, v, features, key_padding_mask)


def performer_attention_backward_body(g_out, q, k, v, features, key_padding_mask, kernel_fn, causal, scale, needs):
    """Gradients of :func:`performer_attention` w.r.t. (q, k, v, features, key_padding_mask) given
    g_out = ∂loss/∂out (B, H, Lq, dv); entry i is None unless ``needs[i]`` (the mask's only if it is float).

    With numden = φ(Q)(φ(K)ᵀ[V, 1]) = [num, den] and out = num / den_c (den_c = max(den, EPS)):
    g_num = g_out / den_c, g_den = −(g_out · out) / den_c (0 where the clamp is active), and, non-causal,
    ∂φ(Q) = [g_num, g_den] (φ(K)ᵀ[V, 1])ᵀ, G = φ(Q)ᵀ[g_num, g_den], ∂φ(K) = [V, 1] Gᵀ, ∂V = φ(K) G[:, :dv];
    causal: the same sums over s ≤ t (queries) and t ≥ s (keys). The feature maps' own backward follows
    (:func:`_feature_map_backward`). Features are recomputed from the inputs, not stored.
    """
    _check(q, k, v, features, key_padding_mask, kernel_fn, causal, scale)
    need_q, need_k, need_v, need_W, need_mask = needs
    need_mask = need_mask and key_padding_mask is not None and key_padding_mask.dtype.is_floating_point
    (out, den, den_c, phi_q, q_work, phi_k, k_work, v1, W, root_scale,
     bias) = _forward_parts(q, k, v, features, key_padding_mask, kernel_fn, causal, scale)
    g = g_out.to(out.dtype)
    g_num = g / den_c
    # d(num/den)/d den = −out/den, zero where the clamp is active.
    g_den = torch.where(den > EPS, -(g * out).sum(-1, keepdim=True) / den_c, torch.zeros_like(den))
    g_numden = torch.cat([g_num, g_den], dim=-1)  # (B, H, Lq, dv+1)
    if causal:
        g_phi_q = causal_product(g_numden, v1, phi_k)
        g_phi_k = anticausal_product(v1, g_numden, phi_q)
        g_v1 = anticausal_product(phi_k, phi_q, g_numden) if need_v else None
    else:
        kv = phi_k.transpose(-2, -1) @ v1  # (B, H, m, dv+1)
        g_phi_q = g_numden @ kv.transpose(-2, -1)
        g_kv = phi_q.transpose(-2, -1) @ g_numden
        g_phi_k = v1 @ g_kv.transpose(-2, -1)
        g_v1 = phi_k @ g_kv if need_v else None
    gq, gWq, _ = _feature_map_backward(g_phi_q, phi_q, q_work, W, kernel_fn, root_scale, None, need_q, need_W)
    gk, gWk, g_bias = _feature_map_backward(g_phi_k, phi_k, k_work, W, kernel_fn, root_scale, bias, need_k, need_W)
    gv = g_v1[..., :-1].to(v.dtype) if need_v else None
    gW = (gWq + gWk).to(features.dtype) if need_W else None
    g_mask = g_bias.sum(1).to(key_padding_mask.dtype) if need_mask else None  # b is shared by all heads
    return gq.to(q.dtype) if need_q else None, gk.to(k.dtype) if need_k else None, gv, gW, g_mask


def _backward_fake(g_out, q, k, v, features, key_padding_mask, kernel_fn, causal, scale, needs):
    _check(q, k, v, features, key_padding_mask, kernel_fn, causal, scale)
    needs = list(needs)
    needs[4] = needs[4] and key_padding_mask is not None and key_padding_mask.dtype.is_floating_point
    like = (q, k, v, features, key_padding_mask)
    return tuple(t.new_empty(t.shape) if need else None for need, t in zip(needs, like))


performer_attention_backward = define_op(
    "performer_attention_backward(Tensor g_out, Tensor q, Tensor k, Tensor v, Tensor features, "
    "Tensor? key_padding_mask, str kernel_fn, bool causal, float? scale, bool[5] needs) "
    "-> (Tensor?, Tensor?, Tensor?, Tensor?, Tensor?)", performer_attention_backward_body, _backward_fake)


def _backward(ctx, g_out):
    check_no_double_backward("performer_attention")
    q, k, v, features, key_padding_mask = ctx.saved_tensors
    n_inputs = len(ctx.needs_input_grad)  # trailing arguments left at their defaults are not counted
    needs = [*ctx.needs_input_grad, False, False, False, False, False][:5]
    grads = torch.ops.panther.performer_attention_backward(g_out, q, k, v, features, key_padding_mask, ctx.kernel,
                                                           ctx.causal, ctx.scale, needs)
    return grads[:n_inputs]


register_autograd("performer_attention", _backward, _setup)
# q, k, v in the autocast dtype, as SDPA; the feature matrix and a float mask keep their precision.
autocast_to_lower_precision("panther::performer_attention", cast_args=3)


# ---- multi-head attention (functional) -------------------------------------------------------------------
def _in_projection(query: Tensor, key: Tensor, value: Tensor, in_proj_weight: Optional[Tensor],
                   in_proj_bias: Optional[Tensor], q_proj_weight: Optional[Tensor], k_proj_weight: Optional[Tensor],
                   v_proj_weight: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """q, k, v projections as ``F.multi_head_attention_forward`` computes them (one GEMM for self-attention)."""
    F = torch.nn.functional
    b_q = b_k = b_v = None
    if in_proj_bias is not None:
        b_q, b_k, b_v = in_proj_bias.chunk(3)
    if in_proj_weight is None:
        return (F.linear(query, q_proj_weight, b_q), F.linear(key, k_proj_weight, b_k),
                F.linear(value, v_proj_weight, b_v))
    if query is key and key is value:
        return F.linear(query, in_proj_weight, in_proj_bias).chunk(3, dim=-1)
    w_q, w_k, w_v = in_proj_weight.chunk(3)
    return F.linear(query, w_q, b_q), F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)


def performer_multi_head_attention(query: Tensor, key: Tensor, value: Tensor, num_heads: int,
                                   in_proj_weight: Optional[Tensor], in_proj_bias: Optional[Tensor],
                                   out_proj_weight: Tensor, out_proj_bias: Optional[Tensor], features: Tensor,
                                   key_padding_mask: Optional[Tensor] = None, *, kernel: str = "softmax",
                                   causal: bool = False, q_proj_weight: Optional[Tensor] = None,
                                   k_proj_weight: Optional[Tensor] = None, v_proj_weight: Optional[Tensor] = None,
                                   dropout_p: float = 0.0, training: bool = False) -> Tensor:
    """``F.multi_head_attention_forward`` with Performer attention, on sequence-first inputs.

    query (L, N, E), key (S, N, kdim), value (S, N, vdim), packed ``in_proj_weight`` (3E, E) or separate
    q/k/v projection weights, features (m, E/num_heads), key_padding_mask (N, S) bool (True = ignore) or float
    (additive) -> (L, N, E).

    Dropout (training only) zeroes whole keys in the numerator, independently per batch and head, and
    rescales by 1/(1 − p); the denominator keeps every key. In expectation this equals attention dropout with
    one mask per key shared by all queries (per-entry dropout has no linear-time form).
    """
    L, N, E = query.shape
    S = key.shape[0]
    head_dim = E // num_heads
    q, k, v = _in_projection(query, key, value, in_proj_weight, in_proj_bias, q_proj_weight, k_proj_weight,
                             v_proj_weight)
    q = q.reshape(L, N, num_heads, head_dim).permute(1, 2, 0, 3)
    k = k.reshape(S, N, num_heads, head_dim).permute(1, 2, 0, 3)
    v = v.reshape(S, N, num_heads, head_dim).permute(1, 2, 0, 3)
    if training and dropout_p > 0.0:
        keep = torch.nn.functional.dropout(v.new_ones(N, num_heads, S, 1), p=dropout_p, training=True)
        v = v * keep
    out = performer_attention(q, k, v, features, key_padding_mask, kernel=kernel, causal=causal)
    out = out.permute(2, 0, 1, 3).reshape(L, N, E)
    return torch.nn.functional.linear(out, out_proj_weight, out_proj_bias)
