"""The panther backend's attention rewrites: HF BERT (SDPA), nn.MultiheadAttention, TransformerEncoderLayer."""

import pytest
import torch
from torch._dynamo.utils import counters

from panther_fx.backend import last_report, panther_backend
from panther_fx.linalg import layer_generator
from panther_fx.linalg.features import orthogonal_features
from panther_fx.ops.attention import performer_multi_head_attention

PERFORMER = {"rule": [{"match": "**", "op": "attention", "method": "performer", "features": 128}]}


def _compile(model, policy=PERFORMER, **options):
    return torch.compile(model, backend=panther_backend, options={"policy": policy, **options}, fullgraph=True)


def _rows(op="attention"):
    return [r for r in last_report() if r.op == op]


class SelfAttention(torch.nn.Module):
    """A module around nn.MultiheadAttention, so the node has a module path ("mha")."""

    def __init__(self, batch_first=True, dropout=0.0, need_weights=False, **kw):
        super().__init__()
        torch.manual_seed(0)
        self.mha = torch.nn.MultiheadAttention(32, 4, batch_first=batch_first, dropout=dropout, **kw)
        with torch.no_grad():
            self.mha.in_proj_weight.mul_(0.5)
        self.need_weights = need_weights

    def forward(self, x, pad=None, mask=None):
        out, weights = self.mha(x, x, x, key_padding_mask=pad, attn_mask=mask, need_weights=self.need_weights)
        return out if weights is None else out + weights.sum()


def _bert():
    from transformers import BertConfig, BertModel

    cfg = BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                     vocab_size=100, max_position_embeddings=64)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return BertModel(cfg).eval()


def test_bert_sdpa_rewrite_padding_inductor_and_no_recompile():
    model = _bert()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 100, (2, 16), generator=g)
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, 11:] = 0
    policy = {"rule": [{"match": "encoder.layer.*.attention.self", "op": "attention", "features": 256}]}
    with torch.no_grad():
        exact = model(input_ids=ids, attention_mask=mask).last_hidden_state
        eager = _compile(model, policy, use_inductor=False)(input_ids=ids, attention_mask=mask).last_hidden_state
        rows = _rows()
        assert [r.path for r in rows if r.status == "rewritten"] == ["encoder.layer.0.attention.self",
                                                                      "encoder.layer.1.attention.self"]
        assert rows[0].rank == 256 and rows[0].shape == (4, 16, 16, 16)
        # Padded keys are ignored: changing padded tokens leaves the real tokens' outputs unchanged.
        ids2 = ids.clone()
        ids2[1, 11:] = (ids2[1, 11:] + 1) % 100
        eager2 = _compile(model, policy, use_inductor=False)(input_ids=ids2, attention_mask=mask).last_hidden_state
        torch.testing.assert_close(eager2[1, :11], eager[1, :11], atol=1e-5, rtol=1e-5)
        assert ((eager - exact).norm() / exact.norm()).item() < 0.02  # small random-init logits
        torch._dynamo.reset()
        compiled = _compile(model, policy)
        inductor = compiled(input_ids=ids, attention_mask=mask).last_hidden_state
        torch.testing.assert_close(inductor, eager, atol=1e-5, rtol=1e-5)
        with torch.compiler.set_stance("fail_on_recompile"):
            compiled(input_ids=ids2, attention_mask=mask)
    assert counters["graph_break"] == {}


def test_bert_dynamic_shapes_symbolic_scale_and_padding_mask():
    """dynamic=True: HF passes SDPA a symbolic scale (folded into q) and builds its padding mask from symbolic
    aranges (``arange(L) >= 0``), which the value bounds prove query-independent: one graph for every
    length, padded keys ignored, and the same numbers as the eager-run rewritten graph."""
    model = _bert()
    policy = {"rule": [{"match": "encoder.layer.*.attention.self", "op": "attention", "features": 256}]}
    eager = torch.compile(model, backend=panther_backend, options={"policy": policy, "use_inductor": False},
                          dynamic=True)
    inductor = torch.compile(model, backend=panther_backend, options={"policy": policy}, dynamic=True)
    with torch.no_grad():
        for L in (12, 20):
            ids = torch.randint(0, 100, (2, L), generator=torch.Generator().manual_seed(L))
            mask = torch.ones(2, L, dtype=torch.long)
            mask[1, L - 5:] = 0
            for attention_mask in (None, mask):
                out = eager(input_ids=ids, attention_mask=attention_mask).last_hidden_state
                assert [r.status for r in _rows()] == ["rewritten"] * 2
                exact = model(input_ids=ids, attention_mask=attention_mask).last_hidden_state
                assert ((out - exact).norm() / exact.norm()).item() < 0.02
                compiled = inductor(input_ids=ids, attention_mask=attention_mask).last_hidden_state
                torch.testing.assert_close(compiled, out, atol=1e-5, rtol=1e-5)
            ids2 = ids.clone()
            ids2[1, L - 5:] = (ids2[1, L - 5:] + 1) % 100
            padded = eager(input_ids=ids2, attention_mask=mask).last_hidden_state
            torch.testing.assert_close(padded[1, :L - 5], out[1, :L - 5], atol=1e-5, rtol=1e-5)


def test_bert_automatic_dynamic_keeps_the_rewrite_on_the_second_length():
    """Without dynamic=True, the second sequence length recompiles with symbolic sizes (automatic dynamic);
    the padding mask must still be rewritten there, and a third length must not recompile."""
    model = _bert()
    policy = {"rule": [{"match": "encoder.layer.*.attention.self", "op": "attention", "features": 256}]}
    compiled = _compile(model, policy, use_inductor=False)
    with torch.no_grad():
        for L in (16, 20, 24):
            ids = torch.randint(0, 100, (2, L), generator=torch.Generator().manual_seed(L))
            mask = torch.ones(2, L, dtype=torch.long)
            mask[0, L - 3:] = 0
            with torch.compiler.set_stance("fail_on_recompile" if L == 24 else "default"):
                compiled(input_ids=ids, attention_mask=mask)
            assert [r.status for r in _rows()] == ["rewritten"] * 2, [r.reason for r in _rows()]


class ArangeMaskedSDPA(torch.nn.Module):
    """SDPA with a mask built from ``arange(L)`` over the queries, as HF does: (rows + shift >= 0) & keep,
    or the causal ``rows >= cols``."""

    def __init__(self, shift=0, causal=False):
        super().__init__()
        self.shift, self.causal = shift, causal

    def forward(self, q, k, v, keep):
        L = q.shape[2]
        rows = torch.arange(L)[None, None, :, None]
        if self.causal:
            mask = rows >= torch.arange(L)[None, None, None, :]
        else:
            mask = ((rows + self.shift) >= 0) & keep[:, None, None, :]
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)


@pytest.mark.parametrize("shift,causal,rewritten", [(0, False, True), (3, False, True), (-1, False, False),
                                                    (0, True, False)])
def test_symbolic_arange_masks_are_proven_only_when_query_independent(shift, causal, rewritten):
    """Under dynamic shapes the mask cannot be evaluated; its value bounds decide. rows - 1 >= 0 is False on
    row 0 (query-dependent) and rows >= cols is causal: both must stay exact."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 10, 8, generator=g) * 0.3 for _ in range(3))
    keep = torch.ones(2, 10, dtype=torch.bool)
    keep[1, 6:] = False
    for t in (q, k, v):
        torch._dynamo.mark_dynamic(t, 2)
    torch._dynamo.mark_dynamic(keep, 1)
    model = ArangeMaskedSDPA(shift, causal)
    with torch.no_grad():
        out = _compile(model, use_inductor=False)(q, k, v, keep)
    assert type(_rows()[0].shape[1]) is not int  # the sequence length was symbolic
    (row,) = _rows()
    if rewritten:
        assert row.status == "rewritten"
        W = orthogonal_features(128, 8, generator=layer_generator(0, ""))
        torch.testing.assert_close(out, torch.ops.panther.performer_attention(q, k, v, W, ~keep))
    else:
        assert row.status == "dense" and "not provably a key-padding mask" in row.reason
        torch.testing.assert_close(out, model(q, k, v, keep))


@pytest.mark.parametrize("batch_first", [True, False])
def test_mha_rewrite_equals_functional_performer(batch_first):
    model = SelfAttention(batch_first=batch_first).eval()
    x = torch.randn(2, 20, 32) if batch_first else torch.randn(20, 2, 32)
    pad = torch.zeros(2, 20, dtype=torch.bool)
    pad[1, 15:] = True
    with torch.no_grad():
        out = _compile(model, use_inductor=False)(x, pad)
        (row,) = _rows()
        assert (row.path, row.status, row.shape) == ("mha", "rewritten", (4, 20, 20, 8))
        W = orthogonal_features(128, 8, generator=layer_generator(0, "mha"))
        seq = x if not batch_first else x.transpose(0, 1)
        m = model.mha
        expected = performer_multi_head_attention(seq, seq, seq, 4, m.in_proj_weight, m.in_proj_bias,
                                                  m.out_proj.weight, m.out_proj.bias, W, pad)
        torch.testing.assert_close(out, expected if not batch_first else expected.transpose(0, 1))


def test_mha_training_through_inductor_gradients_reach_projections():
    model = SelfAttention().train()  # dropout 0: nothing stops the rewrite in training
    x = torch.randn(2, 12, 32)
    grads = []
    for options in ({"use_inductor": False}, {}):
        torch._dynamo.reset()
        model.zero_grad()
        _compile(model, **options)(x).square().sum().backward()
        assert _rows()[0].status == "rewritten"
        grads.append(model.mha.in_proj_weight.grad.clone())
        assert grads[-1].abs().sum() > 0 and model.mha.out_proj.weight.grad is not None
    torch.testing.assert_close(grads[1], grads[0], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("case,reason", [
    ("need_weights", "need_weights=True and the attention weights are used"),
    ("attn_mask", "attn_mask cannot be linearized"),
    ("dropout", "in training: attention dropout has no exact Performer equivalent"),
    ("bias_kv", "bias_k/bias_v"),
])
def test_mha_left_alone_with_reason(case, reason):
    kw = {"need_weights": {"need_weights": True}, "dropout": {"dropout": 0.1}, "bias_kv": {"add_bias_kv": True}}
    model = SelfAttention(**kw.get(case, {})).train(case == "dropout")
    x = torch.randn(2, 6, 32)
    mask = torch.randn(6, 6) if case == "attn_mask" else None
    with torch.no_grad():
        _compile(model, use_inductor=False)(x, None, mask)
    (row,) = _rows()
    assert row.status == "dense" and reason in row.reason


class SDPA(torch.nn.Module):
    def forward(self, q, k, v, mask=None, **kw):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, **kw)


def test_sdpa_masks_causal_and_refusals():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 10, 8, generator=g) * 0.3 for _ in range(3))
    with torch.no_grad():
        # Key-padding mask (B, 1, 1, Lk) in bool: rewritten, and equal to dropping the keys.
        keep = torch.ones(2, 1, 1, 10, dtype=torch.bool)
        keep[1, ..., 6:] = False
        out = _compile(SDPA(), use_inductor=False)(q, k, v, keep)
        assert _rows()[0].status == "rewritten"
        W = orthogonal_features(128, 8, generator=layer_generator(0, ""))
        alone = torch.ops.panther.performer_attention(q[1:], k[1:, :, :6], v[1:, :, :6], W)
        torch.testing.assert_close(out[1:], alone)
        # A general (B, 1, Lq, Lk) mask cannot be proven query-independent: left alone, exact result.
        torch._dynamo.reset()
        arbitrary = torch.rand(2, 1, 10, 10, generator=g) > 0.3
        arbitrary[..., 0] = True
        out = _compile(SDPA(), use_inductor=False)(q, k, v, arbitrary)
        (row,) = _rows()
        assert row.status == "dense" and "not provably a key-padding mask" in row.reason
        torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=arbitrary))
        torch._dynamo.reset()
        _compile(SDPA(), use_inductor=False)(q, k, v, is_causal=True)
        assert _rows()[0].status == "rewritten" and "causal" in _rows()[0].reason
        torch._dynamo.reset()
        _compile(SDPA(), use_inductor=False)(q, k, v, dropout_p=0.2)
        assert "dropout_p = 0.2" in _rows()[0].reason
        # k/v broadcast over heads (one shared head): rewritten before, then refused by the op at run time
        torch._dynamo.reset()
        out = _compile(SDPA(), use_inductor=False)(q, k[:, :1], v[:, :1])
        assert "broadcast against the query's (2, 2)" in _rows()[0].reason
        torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k[:, :1], v[:, :1]))


class LengthScaledSDPA(torch.nn.Module):
    """A softmax scale that depends on the sequence length: symbolic once that length is."""

    def forward(self, q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=1.0 / q.shape[2])


def test_symbolic_scale_gives_the_same_estimator_as_a_constant_one():
    """The symbolic scale is split over q and k, so the Performer sees u·√scale on both sides, as with the
    op's scale argument (all of it on q gave the same logits but a 10–20× noisier estimate)."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 64, 32, generator=g) for _ in range(3))
    for t in (q, k, v):
        torch._dynamo.mark_dynamic(t, 2)
    with torch.no_grad():
        out = _compile(LengthScaledSDPA(), use_inductor=False)(q, k, v)
    assert type(_rows()[0].shape[1]) is not int and _rows()[0].status == "rewritten"
    W = orthogonal_features(128, 32, generator=layer_generator(0, ""))
    torch.testing.assert_close(out, torch.ops.panther.performer_attention(q, k, v, W, scale=1.0 / 64))


@pytest.mark.parametrize("shape", [(2, 1, 1, 1), (1, 1, 1, 1), (1, 1, 1, 10)])
def test_masks_broadcast_over_batch_or_keys(shape):
    """SDPA broadcasts a (B, 1, 1, 1) or (1, 1, 1, 1) mask over the keys; the key mask must be expanded."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 10, 8, generator=g) * 0.3 for _ in range(3))
    bias = torch.randn(shape, generator=g)
    with torch.no_grad():
        out = _compile(SDPA(), use_inductor=False)(q, k, v, bias)
    assert _rows()[0].status == "rewritten"
    W = orthogonal_features(128, 8, generator=layer_generator(0, ""))
    keys = bias[:, 0, 0, :].expand(2, 10)
    torch.testing.assert_close(out, torch.ops.panther.performer_attention(q, k, v, W, keys))


def test_autocast_runs_the_performer_in_the_autocast_dtype_like_sdpa():
    q, k, v = (torch.randn(2, 2, 8, 8) for _ in range(3))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert SDPA()(q, k, v).dtype == torch.bfloat16
        assert _compile(SDPA())(q, k, v).dtype == torch.bfloat16
        W = orthogonal_features(16, 8, generator=0)
        assert torch.ops.panther.performer_attention(q.double(), k.double(), v.double(), W).dtype == torch.float64


def test_symbolic_head_dim_is_left_alone_with_reason():
    """dynamic=True makes the head dim of a bare SDPA symbolic; the feature matrix needs it fixed."""
    q, k, v = (torch.randn(2, 2, 10, 8) for _ in range(3))
    with torch.no_grad():
        out = torch.compile(SDPA(), backend=panther_backend, dynamic=True, fullgraph=True,
                            options={"policy": PERFORMER, "use_inductor": False})(q, k, v)
    (row,) = _rows()
    assert row.status == "dense" and "head dim" in row.reason and "mark_static" in row.reason
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v))


def test_policy_without_attention_rule_leaves_attention_exact():
    model = SelfAttention().eval()
    x = torch.randn(2, 6, 32)
    with torch.no_grad():
        out = _compile(model, {"defaults": {"method": "svd", "rank": 0.5}}, use_inductor=False)(x)
        torch.testing.assert_close(out, model(x))
    assert _rows()[0].status == "dense" and _rows()[0].reason == "no rule matches"


def test_transformer_encoder_layer_train_and_fast_path_report():
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, dropout=0.0, batch_first=True)
    x = torch.randn(2, 10, 32)
    pad = torch.zeros(2, 10, dtype=torch.bool)
    pad[0, 7:] = True
    _compile(layer, use_inductor=False)(x, src_key_padding_mask=pad).sum().backward()
    assert _rows()[0].status == "rewritten" and _rows()[0].path == "self_attn"
    assert layer.self_attn.in_proj_weight.grad.abs().sum() > 0
    torch._dynamo.reset()
    layer.eval()
    with torch.no_grad():
        _compile(layer, use_inductor=False)(x, src_key_padding_mask=pad)
    assert "fast path" in _rows()[0].reason


@pytest.mark.cuda
def test_cuda_op_matches_cpu_and_bf16_is_finite():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 1000, 64, generator=g) * 2 for _ in range(3))
    W = orthogonal_features(256, 64, generator=0)
    pad = torch.zeros(2, 1000, dtype=torch.bool)
    pad[1, 700:] = True
    for causal in (False, True):
        cpu = torch.ops.panther.performer_attention(q, k, v, W, pad, causal=causal)
        gpu = torch.ops.panther.performer_attention(q.cuda(), k.cuda(), v.cuda(), W.cuda(), pad.cuda(), causal=causal)
        torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-4, rtol=1e-4)
        bf = torch.ops.panther.performer_attention(q.cuda().bfloat16() * 10, k.cuda().bfloat16() * 10,
                                                   v.cuda().bfloat16(), W.cuda(), pad.cuda(), causal=causal)
        assert torch.isfinite(bf).all()


@pytest.mark.cuda
def test_cuda_backend_rewrite_inductor_matches_eager():
    model = SelfAttention().cuda().eval()
    x = torch.randn(2, 64, 32, device="cuda")
    with torch.no_grad():
        eager = _compile(model, use_inductor=False)(x)
        torch._dynamo.reset()
        torch.testing.assert_close(_compile(model)(x), eager, atol=1e-4, rtol=1e-4)
