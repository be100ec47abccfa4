"""panther_fx.convert: same decisions, factors and report as the backend; nested and shared modules; clear
errors; HF BertModel and a Llama-style model; state_dict / save / load round trips; training and
torch.compile(backend="panther") gradients; the distill recipe."""

import copy

import pytest
import torch
from torch import nn

import panther_fx
from panther_fx.convert import CONVERTERS, ConversionError, read_policy
from panther_fx.nn import LowRankLinear, SKLinear
from panther_fx.passes import inspect_model

D = torch.float64


class Block(nn.Module):
    def __init__(self, d=32, h=64):
        super().__init__()
        self.up = nn.Linear(d, h)
        self.down = nn.Linear(h, d, bias=False)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


class Net(nn.Module):
    """Nested blocks, one block reachable at two paths, a small layer below min_features."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([Block(), Block()])
        self.shared = self.blocks[1]
        self.head = nn.Linear(32, 4)

    def forward(self, x):
        for block in self.blocks:
            x = x + block(x)
        return self.head(self.shared(x))


SVD = {"defaults": {"method": "svd", "rank": 8, "min_features": 16}}
MIXED = {"defaults": {"method": "svd", "rank": 8, "min_features": 16},
         "rule": [{"match": "blocks.0.up", "method": "sketch", "num_terms": 2, "low_rank": 2}]}


def make_net(dtype=torch.float32):
    torch.manual_seed(0)
    return Net().to(dtype)


def test_convert_swaps_selected_layers_and_keeps_shared_modules_shared():
    model = make_net()
    report = panther_fx.convert(model, MIXED)
    assert isinstance(model.blocks[0].up, SKLinear) and isinstance(model.blocks[0].down, LowRankLinear)
    assert isinstance(model.blocks[1].up, LowRankLinear)
    assert model.shared is model.blocks[1]  # the shared block is converted once and stays one object
    assert type(model.head) is nn.Linear  # min(I, O) = 4 < min_features
    assert [r.path for r in report] == ["blocks.0.up", "blocks.0.down", "blocks.1.up", "blocks.1.down", "head"]
    assert [r.status for r in report] == ["rewritten"] * 4 + ["dense"]
    assert "min_features" in report[-1].reason
    # what save stores: the rewritten layers at their exact paths with resolved settings, the rest dense
    stored = model.panther_policy
    assert stored.defaults == {"method": "dense"}
    assert [(r.match, r.op, r.settings["method"], r.settings.get("rank")) for r in stored.rules] == [
        ("blocks.0.up", "linear", "sketch", None), ("blocks.0.down", "linear", "svd", 8),
        ("blocks.1.up", "linear", "svd", 8), ("blocks.1.down", "linear", "svd", 8)]


def test_a_layer_named_twice_under_one_parent_is_converted_at_both_names():
    """named_children() yields a module once per parent: the second name used to keep the dense layer."""
    torch.manual_seed(0)
    lin = nn.Linear(32, 32)
    model = nn.Sequential(lin, nn.ReLU(), lin)
    x = torch.randn(3, 32)
    full = panther_fx.convert(model, {"defaults": {"method": "svd", "rank": 32, "min_features": 16, "force": True}},
                              inplace=False)[0]
    assert isinstance(full[2], LowRankLinear) and full[2] is full[0]
    assert not any(isinstance(m, nn.Linear) for m in full.modules())
    torch.testing.assert_close(full(x), model(x), atol=1e-5, rtol=1e-5)  # full rank: the dense model
    report = panther_fx.convert(model, SVD)
    assert [r.path for r in report] == ["0"] and model[2] is model[0]
    assert sum(p.numel() for p in model.parameters()) == 8 * 32 * 2 + 32


def test_convert_has_the_backends_factors_and_report():
    """Same matcher, factorization and seeds as backend='panther': outputs agree to rounding."""
    model = make_net()
    x = torch.randn(5, 32)
    converted, report = panther_fx.convert(model, MIXED, inplace=False)
    assert [type(m) for m in model.modules()].count(nn.Linear) == 5  # original untouched
    compiled = torch.compile(model, backend="panther", fullgraph=True,
                             options={"policy": MIXED, "use_inductor": False})
    with torch.no_grad():
        torch.testing.assert_close(converted(x), compiled(x), rtol=1e-6, atol=1e-6)
    backend_rows = {r.path: r for r in panther_fx.last_report()}
    for row in report:
        if row.status == "rewritten":
            assert row == backend_rows[row.path]
    assert list(report) == list(inspect_model(model, panther_fx.Policy.load(MIXED)))


def test_full_rank_svd_reproduces_the_model_float64():
    model = make_net(D)
    x = torch.randn(3, 32, dtype=D)
    expected = model(x)
    panther_fx.convert(model, {"defaults": {"method": "svd", "rank": 32, "min_features": 16, "force": True}})
    assert isinstance(model.blocks[0].up, LowRankLinear) and model.blocks[0].up.A.dtype == D
    torch.testing.assert_close(model(x), expected, rtol=1e-10, atol=1e-10)


def test_frozen_layers_stay_frozen():
    model = make_net()
    model.blocks[0].requires_grad_(False)
    panther_fx.convert(model, SVD)
    assert not any(p.requires_grad for p in model.blocks[0].parameters())
    assert all(p.requires_grad for p in model.blocks[1].parameters())


def test_rule_naming_an_unconvertible_module_is_an_error():
    class Attention(nn.Module):
        def forward(self, x):
            return x

    model = nn.Sequential(nn.Linear(32, 32), Attention())
    policy = {"rule": [{"match": "1", "op": "attention", "method": "performer"}]}
    with pytest.raises(ConversionError, match=r"rule 1 \(match = '1', op = 'attention'\) selects '1' \(Attention\)"):
        panther_fx.convert(model, policy)
    # an earlier op-less dense rule protects it (no Linear matches either rule: both are reported unused)
    with pytest.warns(UserWarning, match="matched no layer"):
        panther_fx.convert(model, {"rule": [{"match": "1", "method": "dense"}, *policy["rule"]]})


def test_tied_weight_stays_dense_or_errors_when_a_rule_names_it():
    emb = nn.Embedding(50, 32)
    head = nn.Linear(32, 50, bias=False)
    head.weight = emb.weight
    model = nn.ModuleDict({"emb": emb, "head": head})
    report = panther_fx.convert(model, {"defaults": {"method": "svd", "rank": 4}})
    assert type(model["head"]) is nn.Linear and "shared with 'emb.weight'" in report[0].reason
    with pytest.raises(ConversionError, match="rule 1 .* selects 'head' .*shared with 'emb.weight'"):
        panther_fx.convert(model, {"rule": [{"match": "head", "rank": 4}]})


def test_multihead_attention_out_proj_is_left_alone_or_refused():
    model = nn.Sequential(nn.MultiheadAttention(32, 4))
    report = panther_fx.convert(model, {"defaults": {"method": "svd", "rank": 4}})
    assert type(model[0].out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    rows = {r.path: r for r in report}
    assert rows["0"].op == "attention" and rows["0"].status == "dense"  # no attention rule
    assert rows["0.out_proj"].status == "dense" and "MultiheadAttention" in rows["0.out_proj"].reason
    with pytest.raises(ConversionError, match="out_proj"):
        panther_fx.convert(model, {"rule": [{"match": "0.out_proj", "rank": 4}]})


def test_asvd_without_calibration_is_refused_when_a_rule_names_it():
    with pytest.raises(ConversionError, match="rule 1 .*'blocks.0.up'.*asvd.*calibration"):
        panther_fx.convert(make_net(), {"rule": [{"match": "blocks.0.up", "method": "asvd", "rank": 4}]})


def test_asvd_with_calibration_matches_the_backend():
    from panther_fx.calibration import calibrate

    torch.manual_seed(0)
    model = nn.Sequential(Block(), Block())  # no shared module: the backend would see it at its second path
    policy = {"defaults": {"method": "asvd", "rank": 8, "min_features": 16}}
    g = torch.Generator().manual_seed(0)
    grams = calibrate(model, [torch.randn(64, 32, generator=g) for _ in range(2)])
    converted, report = panther_fx.convert(model, policy, calibration=grams, inplace=False)
    assert isinstance(converted[0].up, LowRankLinear) and report[0].method == "asvd"
    compiled = torch.compile(model, backend="panther", options={"policy": policy, "calibration": grams,
                                                                "use_inductor": False})
    x = torch.randn(5, 32, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(converted(x), compiled(x), rtol=1e-6, atol=1e-6)


def test_bare_layer_is_refused():
    with pytest.raises(ValueError, match="wrap the bare Linear"):
        panther_fx.convert(nn.Linear(8, 8), SVD)


def test_converter_table_is_the_extension_point():
    assert CONVERTERS[nn.Linear].__name__ == "convert_linear"


def test_state_dict_round_trip_into_a_freshly_converted_model():
    model = make_net()
    panther_fx.convert(model, MIXED)
    with torch.no_grad():  # make the factors differ from a fresh conversion
        for p in model.parameters():
            p.add_(0.01)
    fresh = make_net()
    panther_fx.convert(fresh, MIXED)
    fresh.load_state_dict(model.state_dict(), strict=True)
    x = torch.randn(4, 32)
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)


def test_save_and_load_with_the_stored_policy(tmp_path):
    model = make_net()
    panther_fx.convert(model, MIXED)
    with torch.no_grad():
        model.blocks[0].up.S1s.mul_(2)
    path = tmp_path / "net.safetensors"
    panther_fx.save(model, path)
    assert read_policy(path) == model.panther_policy
    loaded = panther_fx.load(path, make_net)
    x = torch.randn(4, 32)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    assert loaded.shared is loaded.blocks[1]
    with pytest.raises(RuntimeError, match="same architecture"), pytest.warns(UserWarning, match="matched no layer"):
        panther_fx.load(path, lambda: nn.Sequential(nn.Linear(32, 32)))
    with pytest.raises(ValueError, match="no policy"):
        panther_fx.save(make_net(), tmp_path / "plain.safetensors")


def test_a_model_converted_twice_saves_and_loads(tmp_path):
    """save stored only the second convert's policy: load then failed on the first one's factors."""
    model = make_net()
    panther_fx.convert(model, {"defaults": {"method": "dense"}, "rule": [{"match": "blocks.0.*", "method": "svd",
                                                                          "rank": 8}]})
    panther_fx.convert(model, {"defaults": {"method": "dense"}, "rule": [{"match": "blocks.1.up", "method": "sketch",
                                                                          "num_terms": 2, "low_rank": 2}]})
    path = tmp_path / "twice.safetensors"
    panther_fx.save(model, path)
    loaded = panther_fx.load(path, make_net)
    assert [type(m).__name__ for m in (loaded.blocks[0].up, loaded.blocks[0].down, loaded.blocks[1].up,
                                        loaded.blocks[1].down)] == ["LowRankLinear", "LowRankLinear", "SKLinear",
                                                                    "Linear"]
    x = torch.randn(4, 32)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_an_asvd_model_loads_without_calibration(tmp_path):
    """The stored policy said asvd, so load needed the calibration again, and without it blamed the
    architecture; the layers are stored resolved (svd of the same rank), which the saved factors replace."""
    from panther_fx.calibration import calibrate

    model = make_net()
    policy = {"defaults": {"method": "asvd", "rank": 8, "min_features": 16}}
    grams = calibrate(model, [torch.randn(64, 32, generator=torch.Generator().manual_seed(0))], policy=policy)
    panther_fx.convert(model, policy, calibration=grams)
    path = tmp_path / "asvd.safetensors"
    panther_fx.save(model, path)
    loaded = panther_fx.load(path, make_net)
    x = torch.randn(4, 32)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_load_of_a_file_that_is_not_safetensors_names_it(tmp_path):
    path = tmp_path / "policy.toml"
    path.write_text('[defaults]\nmethod = "svd"\n')
    with pytest.raises(panther_fx.PolicyError, match=f"{path}: not a safetensors file"):
        panther_fx.load(path, make_net)
    with pytest.raises(panther_fx.PolicyError, match=f"{path}: not a safetensors file"):
        read_policy(path)


def test_load_refuses_a_file_without_a_policy(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(panther_fx.PolicyError, match="not a panther_fx checkpoint"):
        panther_fx.load(path, make_net)


def test_load_names_the_file_of_a_corrupt_stored_policy(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "corrupt.safetensors"
    save_file({"w": torch.zeros(2)}, str(path),
              metadata={"panther_fx.format": "panther_fx/1", "panther_fx.policy": "[defaults\n"})
    with pytest.raises(panther_fx.PolicyError, match=r"corrupt\.safetensors\[panther_fx\.policy\]: invalid TOML"):
        read_policy(path)


def test_compiled_converted_model_has_eager_gradients():
    """torch.compile(backend='panther') without a policy keeps the panther modules' ops: same gradients."""
    model = make_net()
    panther_fx.convert(model, MIXED)
    twin = copy.deepcopy(model)
    compiled = torch.compile(twin, backend="panther", fullgraph=True)
    x = torch.randn(6, 32)
    model(x).square().sum().backward()
    compiled(x).square().sum().backward()
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5, msg=name)
    with torch.compiler.set_stance("fail_on_recompile"):
        compiled(torch.randn(6, 32)).sum().backward()


def test_converted_model_trains():
    """The student starts as the teacher compressed at rank 8 and learns the difference back."""
    torch.manual_seed(1)
    teacher = make_net()
    student = make_net()
    panther_fx.convert(student, MIXED)
    x = torch.randn(128, 32)
    y = teacher(x).detach()
    opt = torch.optim.Adam(student.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = nn.functional.mse_loss(student(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 4


def _distill_setup():
    """A teacher, its rank-4 svd student and 8 batches of inputs."""
    teacher = make_net()
    student, _ = panther_fx.convert(teacher, {"defaults": {"method": "svd", "rank": 4, "min_features": 16}},
                                    inplace=False)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(32, 32, generator=g) for _ in range(8)]
    return teacher, student, batches


def test_distill_reduces_the_gap_to_the_teacher():
    teacher, student, batches = _distill_setup()
    history = panther_fx.distill(student, teacher, batches, epochs=4, lr=1e-2, progress=False)
    assert len(history) == 4 and history[-1] < history[0] / 2
    assert student.training and teacher.training  # modes restored (distill trains with dropout off)
    cos = panther_fx.distill(student, teacher, batches, epochs=1, lr=1e-3, loss="cosine", progress=False)
    assert len(cos) == 1
    with pytest.raises(ValueError, match="loss must be"):
        panther_fx.distill(student, teacher, batches, loss="l1")


def test_similarity_loss_is_cosine_plus_in_batch_kl():
    from panther_fx.distill import _loss

    g = torch.Generator().manual_seed(0)
    ht = torch.randn(6, 5, 8, generator=g, dtype=torch.float64)
    hs = ht + 0.3 * torch.randn(6, 5, 8, generator=g, dtype=torch.float64)
    mask = torch.ones(6, 5, 1, dtype=torch.float64)
    mask[:3, 3:] = 0  # padding
    pooled = [nn.functional.normalize((h * mask).sum(1) / mask.sum(1), dim=-1) for h in (hs, ht)]
    cosine = (1 - (pooled[0] * pooled[1]).sum(-1)).mean()
    kl = 0.0
    for i in range(6):  # explicit float64 formula, row by row, the diagonal left out
        others = [j for j in range(6) if j != i]
        p_s = torch.softmax(pooled[0][i] @ pooled[0][others].T / 0.1, -1)
        p_t = torch.softmax(pooled[1][i] @ pooled[1][others].T / 0.1, -1)
        kl += (p_t * (p_t / p_s).log()).sum() / 6
    torch.testing.assert_close(_loss("similarity", hs, ht, mask, 0.1), cosine + kl)
    torch.testing.assert_close(_loss("cosine", hs, ht, mask, 0.1), cosine)
    assert _loss("similarity", ht, ht, mask, 0.1).abs().item() < 1e-12


def test_distill_with_similarity_loss():
    teacher, student, batches = _distill_setup()
    history = panther_fx.distill(student, teacher, batches, epochs=8, lr=1e-2, loss="similarity",
                                 temperature=0.1, progress=False)
    assert history[-1] < history[0] / 2
    with pytest.raises(ValueError, match="temperature must be > 0"):
        panther_fx.distill(student, teacher, batches, loss="similarity", temperature=0)
    with pytest.raises(ValueError, match="at least 3 texts"):
        panther_fx.distill(student, teacher, [torch.randn(2, 32)], loss="similarity")


def _bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
                        vocab_size=100, max_position_embeddings=32, attn_implementation="sdpa")
    return BertModel(config).eval()


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, max_position_embeddings=64, tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


def test_hf_bert_convert_save_load(tmp_path):
    model = _bert()
    ids = torch.randint(0, 100, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    policy = {"defaults": {"method": "svd", "rank": 16, "min_features": 64},
              "rule": [{"match": "encoder.layer.*.intermediate.dense", "method": "sketch", "low_rank": 4}]}
    report = panther_fx.convert(model, policy)
    assert isinstance(model.encoder.layer[1].intermediate.dense, SKLinear)
    assert isinstance(model.encoder.layer[0].attention.self.query, LowRankLinear)
    assert len(report.rewritten) == 13
    out = model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert torch.isfinite(out).all()
    panther_fx.save(model, tmp_path / "bert.safetensors")
    loaded = panther_fx.load(tmp_path / "bert.safetensors", _bert)
    torch.testing.assert_close(loaded(input_ids=ids, attention_mask=mask).last_hidden_state, out, rtol=0, atol=0)


def test_hf_llama_convert_train_step_and_state_dict():
    model = _llama()
    report = panther_fx.convert(model, {"defaults": {"method": "svd", "rank": 0.25}})
    rows = {r.path: r for r in report}
    assert isinstance(model.model.layers[0].mlp.gate_proj, LowRankLinear)
    assert type(model.lm_head) is nn.Linear and "shared with 'model.embed_tokens.weight'" in rows["lm_head"].reason
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids = torch.randint(0, 128, (2, 16))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(5):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    fresh = _llama()
    panther_fx.convert(fresh, {"defaults": {"method": "svd", "rank": 0.25}})
    fresh.load_state_dict(model.state_dict(), strict=True)
    model.eval(), fresh.eval()
    torch.testing.assert_close(fresh(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)


def test_linear_subclass_is_reported_dense_or_refused():
    class Scaled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    model = nn.Sequential(Scaled(32, 32))
    report = panther_fx.convert(model, {"defaults": {"method": "svd", "rank": 4}})
    assert type(model[0]) is Scaled and report[0].status == "dense" and "Scaled subclasses nn.Linear" in report[0].reason
    with pytest.raises(ConversionError, match="rule 1 .* selects '0' \\(Scaled\\)"):
        panther_fx.convert(model, {"rule": [{"match": "0", "rank": 4}]})


def test_conv2d_convert_matches_the_backend():
    from panther_fx.nn import LowRankConv2d, SKConv2d

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, stride=2, bias=False))
    policy = {"defaults": {"method": "svd", "rank": 6},
              "rule": [{"match": "2", "op": "conv2d", "method": "sketch", "num_terms": 1, "low_rank": 4}]}
    converted, report = panther_fx.convert(model, policy, inplace=False)
    assert type(converted[0]) is LowRankConv2d and type(converted[2]) is SKConv2d
    assert [r.status for r in report] == ["rewritten", "rewritten"]
    compiled = torch.compile(model, backend="panther", fullgraph=True, options={"policy": policy, "use_inductor": False})
    x = torch.randn(2, 8, 12, 12)
    with torch.no_grad():
        torch.testing.assert_close(converted(x), compiled(x), rtol=1e-5, atol=1e-5)


def test_multihead_attention_converts_to_performer():
    from panther_fx.nn import RandMultiheadAttention

    torch.manual_seed(0)
    model = nn.Sequential(nn.MultiheadAttention(32, 4, batch_first=True))
    policy = {"rule": [{"match": "0", "op": "attention", "method": "performer", "features": 64}]}
    converted, report = panther_fx.convert(model, policy, inplace=False)
    assert type(converted[0]) is RandMultiheadAttention and report[0].method == "performer" and len(report) == 1
    torch.testing.assert_close(converted[0].out_proj.weight, model[0].out_proj.weight)
    x = torch.randn(2, 10, 32)
    out, _ = converted[0](x, x, x, need_weights=False)
    exact, _ = model[0](x, x, x, need_weights=False)
    assert out.shape == exact.shape and torch.isfinite(out).all()
    assert (out - exact).norm() < 0.5 * exact.norm()  # a Performer approximation of the same attention


# ---- glob rules cover containers and activations; only an exact path or the rule's own kind is refused ------
def _encoder(layers=2):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True, dropout=0.0)
    return nn.TransformerEncoder(layer, layers)


def test_glob_rule_with_an_op_skips_activations_and_containers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32))
    report = panther_fx.convert(model, {"rule": [{"match": "**", "op": "linear", "rank": 4}]})
    assert [type(m) for m in model] == [LowRankLinear, nn.ReLU, LowRankLinear]
    assert [r.path for r in report] == ["0", "2"]


def test_glob_attention_rule_converts_every_attention_of_an_encoder():
    from panther_fx.nn import RandMultiheadAttention

    model = _encoder()
    report = panther_fx.convert(model, {"rule": [{"match": "**", "op": "attention", "features": 16}]})
    assert all(type(layer.self_attn) is RandMultiheadAttention for layer in model.layers)
    assert [r.path for r in report.rewritten] == ["layers.0.self_attn", "layers.1.self_attn"]


def test_glob_rule_reports_out_proj_subclasses_and_tied_weights_dense():
    class Scaled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    model = nn.ModuleDict({"enc": _encoder(1), "scaled": Scaled(16, 16), "emb": nn.Embedding(40, 16),
                           "head": nn.Linear(16, 40, bias=False)})
    model["head"].weight = model["emb"].weight
    report = panther_fx.convert(model, {"rule": [{"match": "**", "rank": 4}]})  # op-less: every Linear
    rows = {r.path: r for r in report}
    assert isinstance(model["enc"].layers[0].linear1, LowRankLinear)
    assert rows["enc.layers.0.self_attn.out_proj"].status == "dense"
    assert "out_proj" in rows["enc.layers.0.self_attn.out_proj"].reason
    assert rows["scaled"].status == "dense" and "subclasses nn.Linear" in rows["scaled"].reason
    assert rows["head"].status == "dense" and "shared with 'emb.weight'" in rows["head"].reason
    # the same layers named by their exact path are refused
    for path, why in [("enc.layers.0.self_attn.out_proj", "out_proj"), ("scaled", "Scaled"), ("head", "shared")]:
        with pytest.raises(ConversionError, match=f"rule 1 \\(match = '{path}'.*{why}"):
            panther_fx.convert(copy.deepcopy(model), {"rule": [{"match": path, "op": "linear", "rank": 4}]})


def test_conv2d_subclass_is_reported_dense_or_refused():
    class Doubled(nn.Conv2d):
        def forward(self, x):
            return 2 * super().forward(x)

    model = nn.Sequential(Doubled(8, 16, 3))
    report = panther_fx.convert(model, {"rule": [{"match": "**", "op": "conv2d", "rank": 2}]})
    assert type(model[0]) is Doubled and report[0].status == "dense" and "Doubled subclasses nn.Conv2d" in report[0].reason
    with pytest.raises(ConversionError, match="rule 1 .* selects '0' \\(Doubled\\)"):
        panther_fx.convert(model, {"rule": [{"match": "0", "op": "conv2d", "rank": 2}]})


def test_exact_rule_naming_a_container_is_refused():
    model = nn.Sequential(nn.Sequential(nn.Linear(32, 32)))
    with pytest.raises(ConversionError, match=r"rule 1 \(match = '0'\) selects '0' \(Sequential\)"):
        panther_fx.convert(model, {"rule": [{"match": "0", "rank": 4}]})


@pytest.mark.parametrize("rule", [{"match": "layers.*.self_attn", "op": "attention", "features": 16},
                                  {"match": "layers.*.linear1", "rank": 4}], ids=["performer", "svd"])
def test_converted_encoder_runs_the_inference_fast_path_case(rule):
    """eval + no_grad + a padding mask is where nn.TransformerEncoder packs a nested tensor and its layers call
    a fused kernel on the dense weights: converted layers must take the ordinary path, with the same result."""
    model = _encoder()
    converted, _ = panther_fx.convert(model, {"rule": [rule]}, inplace=False)
    converted.eval()
    x = torch.randn(2, 6, 16, generator=torch.Generator().manual_seed(0))
    pad = torch.zeros(2, 6, dtype=torch.bool)
    pad[1, 3:] = True
    expected = converted(x, src_key_padding_mask=pad)  # grad enabled: never the fast path
    with torch.no_grad():
        out = converted(x, src_key_padding_mask=pad)
        unmasked = converted(x)
    # dense nn.MultiheadAttention takes its own fused kernel under no_grad: equal up to rounding
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(unmasked, converted(x), rtol=1e-5, atol=1e-6)
    assert model.use_nested_tensor and model.layers[0].activation_relu_or_gelu  # the dense original keeps them


def test_frozen_multihead_attention_stays_frozen():
    torch.manual_seed(0)
    model = nn.Sequential(nn.MultiheadAttention(16, 2), nn.MultiheadAttention(16, 2))
    model[0].requires_grad_(False)
    model[1].out_proj.requires_grad_(False)  # partly frozen: each parameter keeps its own flag
    panther_fx.convert(model, {"rule": [{"match": "*", "op": "attention", "features": 16}]})
    assert not any(p.requires_grad for p in model[0].parameters())
    assert [n for n, p in model[1].named_parameters() if p.requires_grad] == ["in_proj_weight", "in_proj_bias"]


def test_asvd_defaults_without_calibration_warn_once():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))
    with pytest.warns(UserWarning) as caught:
        report = panther_fx.convert(model, {"defaults": {"method": "asvd", "rank": 8}})
    messages = [str(w.message) for w in caught if "asvd" in str(w.message)]
    assert len(messages) == 1 and "left 2 layers dense ('0', '1')" in messages[0] and "calibration=" in messages[0]
    assert [type(m) for m in model] == [nn.Linear, nn.Linear] and not report.rewritten
