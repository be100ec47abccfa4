import copy
import io
import pickle
import warnings

import pytest
import torch
from torch import nn

from panther_fx.policy import Policy, PolicyError, compile_pattern, load_policy


def write(tmp_path, text, name="panther.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


# ---- patterns ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("pattern, path, expected", [
    ("encoder.layer.*.output.dense", "encoder.layer.0.output.dense", True),
    ("encoder.layer.*.output.dense", "encoder.layer.0.attention.output.dense", False),  # fnmatch would match
    ("encoder.layer.0.**", "encoder.layer.0.attention.self.query", True),
    ("encoder.layer.0.**", "encoder.layer.0", True),
    ("encoder.layer.0.**", "encoder.layer.10.output", False),
    ("**.dense", "encoder.layer.3.intermediate.dense", True),
    ("**.dense", "dense", True),
    ("**", "", True),
    ("**", "a.b.c", True),
    ("*", "", False),
    ("layer*.conv?", "layer12.conv1", True),
    ("layer*.conv?", "layer12.x.conv1", False),
    ("re:encoder\\.layer\\.[0-2]\\..*", "encoder.layer.2.output.dense", True),
    ("re:encoder\\.layer\\.[0-2]\\..*", "encoder.layer.3.output.dense", False),
    ("re:dense", "encoder.dense", False),  # a regex must match the whole path
])
def test_pattern(pattern, path, expected):
    assert compile_pattern(pattern)(path) is expected


# ---- decisions ---------------------------------------------------------------------------------------
def test_first_matching_rule_wins_and_defaults_fill_in():
    policy = Policy.load({
        "defaults": {"method": "svd", "rank": 0.25},
        "rule": [
            {"match": "encoder.layer.0.**", "method": "dense"},
            {"match": "encoder.layer.*.intermediate.dense", "rank": 32},
            {"match": "**.intermediate.dense", "rank": 8},
        ],
    })
    d = policy.decide("encoder.layer.0.intermediate.dense", "linear", in_features=128, out_features=512)
    assert (d.method, d.origin, d.reason) == ("dense", "rule 1", "rule 1: method = 'dense'")
    d = policy.decide("encoder.layer.1.intermediate.dense", "linear", in_features=128, out_features=512)
    assert (d.method, d.rank, d.origin) == ("svd", 32, "rule 2")
    d = policy.decide("pooler.dense", "linear", in_features=128, out_features=128)
    assert (d.method, d.rank, d.origin) == ("svd", 32, "defaults")  # 0.25 of min(I, O)


def test_without_default_method_unmatched_layers_stay_dense():
    policy = Policy.load({"rule": [{"match": "fc1", "rank": 4}]})
    assert policy.decide("fc1", "linear", in_features=64, out_features=64).method == "svd"
    d = policy.decide("fc2", "linear", in_features=64, out_features=64)
    assert (d.method, d.reason) == ("dense", "no rule matches")


def test_op_filter_and_method_scope():
    policy = Policy.load({
        "defaults": {"method": "svd", "rank": 4},
        "rule": [{"match": "**.self", "op": "attention", "method": "performer", "features": 64}],
    })
    d = policy.decide("layer.0.self", "attention")
    assert (d.method, d.features, d.kernel) == ("performer", 64, "softmax")
    assert policy.decide("other", "attention").method == "dense"  # defaults' svd does not apply to attention
    assert policy.decide("layer.0.self", "linear", in_features=64, out_features=64).origin == "defaults"


def test_break_even_and_min_features_keep_layers_dense():
    policy = Policy.load({"defaults": {"method": "svd", "rank": 40, "min_features": 32}})
    d = policy.decide("a", "linear", in_features=64, out_features=64)  # 40 * 128 >= 64 * 64
    assert d.method == "dense" and "below break-even" in d.reason
    d = policy.decide("b", "linear", in_features=16, out_features=64)
    assert d.method == "dense" and "min_features = 32" in d.reason
    forced = Policy.load({"defaults": {"method": "svd", "rank": 64, "force": True}})
    assert forced.decide("a", "linear", in_features=64, out_features=64).rank == 64


def test_sketch_break_even_counts_both_terms():
    policy = Policy.load({"defaults": {"method": "sketch", "num_terms": 2, "low_rank": 8}})
    assert policy.decide("a", "linear", in_features=256, out_features=256).method == "sketch"  # 32*512 < 65536
    assert policy.decide("b", "linear", in_features=64, out_features=64).method == "dense"  # 32*128 >= 4096


# ---- errors name the source, the rule and the value ------------------------------------------------------
@pytest.mark.parametrize("text, expected", [
    ('[[rule]]\nmatch = "a"\nrnak = 4\n', ["rule 1", "'rnak'", "did you mean 'rank'"]),
    ('[defaults]\nrank = "big"\n', ["[defaults]", "rank = 'big'", "an integer or a float"]),
    ('[[rule]]\nmatch = "a"\n[[rule]]\nmatch = "b"\nrank = 0\n', ["rule 2", "rank = 0", "> 0"]),
    ('[[rule]]\nmatch = "a"\nrank = -3\n', ["rule 1", "rank = -3"]),
    ('[[rule]]\nmatch = "a"\nrank = 1.5\n', ["rule 1", "rank = 1.5", "(0, 1)"]),
    ('[[rule]]\nmatch = "re:enc(oder"\n', ["rule 1", "invalid regular expression", "enc(oder"]),
    ('[[rule]]\nmatch = "a..b"\n', ["rule 1", "empty path segment"]),
    ('[[rule]]\nmatch = "a"\nmethod = "fft"\n', ["rule 1", "method = 'fft'", "svd"]),
    ('[[rule]]\nmatch = "a"\nop = "conv3d"\n', ["rule 1", "op = 'conv3d'"]),
    ('[[rule]]\nmatch = "a"\nop = "attention"\nmethod = "svd"\n', ["rule 1", "does not apply to op = 'attention'"]),
    ('[defaults]\nmethod = "svd"\nrank = 0.25\n[[rule]]\nmatch = "a"\nop = "attention"\n',
     ["rule 1", "method = 'svd' (inherited from [defaults]", "does not apply to op = 'attention'"]),
    ('[[rule]]\nmatch = "a"\nforce = 1\n', ["rule 1", "force = 1", "a boolean"]),
    ('[[rule]]\nmatch = "a"\ndamping = -0.1\n', ["rule 1", "damping = -0.1", "in [0, 1000]"]),
    ('[[rule]]\nmatch = "a"\ndamping = inf\n', ["rule 1", "damping = inf", "in [0, 1000]"]),
    ('[defaults]\nmin_speedup = inf\n', ["[defaults]", "min_speedup = inf", "finite"]),
    ('[defaults]\ndamping = "high"\n', ["[defaults]", "damping = 'high'"]),
    ('[[rule]]\nrank = 4\n', ["rule 1", "missing required key 'match'"]),
    ('[[rule]]\nmatch = "a"\nmethod = "sketch"\n', ["rule 1", "needs low_rank"]),
    ('[rules]\nmatch = "a"\n', ["unknown top-level key 'rules'", "did you mean 'rule'"]),
    ('[defaults\n', ["invalid TOML"]),
])
def test_load_errors(tmp_path, text, expected):
    path = write(tmp_path, text)
    with pytest.raises(PolicyError) as info:
        Policy.load(path)
    message = str(info.value)
    assert str(path) in message
    for fragment in expected:
        assert fragment in message, message


def test_rank_above_min_dim_names_layer(tmp_path):
    policy = Policy.load(write(tmp_path, '[[rule]]\nmatch = "**"\nmethod = "svd"\nrank = 65\n'))
    with pytest.raises(PolicyError, match=r"panther\.toml: rule 1: rank = 65 exceeds min\(I, O\) = 64 of layer 'fc'"):
        policy.decide("fc", "linear", in_features=64, out_features=128)


def test_missing_file_and_wrong_type():
    with pytest.raises(PolicyError, match="cannot read policy file 'nope.toml'"):
        Policy.load("nope.toml")
    with pytest.raises(PolicyError, match="not int"):
        Policy.load(3)


def test_unused_rules_warn_with_file_and_rule(tmp_path):
    policy = Policy.load(write(tmp_path, '[[rule]]\nmatch = "fc1"\nrank = 2\n[[rule]]\nmatch = "decoder.**"\nrank = 2\n'))
    decision = policy.decide("fc1", "linear", in_features=16, out_features=16)
    with pytest.warns(UserWarning, match=r"panther\.toml: rule 2 \(match = 'decoder\.\*\*'\) matched no layer"):
        unused = policy.warn_unused([decision])
    assert [r.index for r in unused] == [2]


def test_toml_round_trip():
    policy = Policy.load({
        "defaults": {"method": "svd", "rank": 0.5, "min_features": 8},
        "rule": [{"match": "re:a\\.b", "op": "linear", "method": "sketch", "num_terms": 2, "low_rank": 4,
                  "force": True}, {"match": 'q"uote', "method": "dense"}],
    })
    assert Policy.load(__import__("tomllib").loads(policy.to_toml())) == policy


@pytest.mark.parametrize("match", ["re:(?x) fc1 \n | fc2", "a\x7fb", "tab\there", "nul\x00\x1f", "cr\r\x08\x0c",
                                   "blöck.*", "emoji\U0001f600", 'back\\slash "quoted"'])
def test_toml_round_trip_escapes_control_characters(match):
    # newlines and control characters used to be written raw: invalid TOML that save wrote and load refused
    policy = Policy.load({"rule": [{"match": match, "rank": 4}]})
    assert Policy.load(__import__("tomllib").loads(policy.to_toml())) == policy


def test_from_toml_names_the_source_of_invalid_text():
    with pytest.raises(PolicyError, match=r"model\.safetensors\[policy\]: invalid TOML: .*line 2, column 11"):
        Policy.from_toml('[[rule]]\nmatch = "a\nb"\n', source="model.safetensors[policy]")


def test_policy_pickles_with_its_rules():
    policy = Policy.load({"defaults": {"method": "svd", "rank": 4},
                          "rule": [{"match": "enc.*.fc?", "rank": 2}, {"match": "re:dec\\.\\d+", "method": "dense"}]})
    for back in (pickle.loads(pickle.dumps(policy)), copy.deepcopy(policy)):
        assert back == policy and back.source == policy.source
        assert back.decide("enc.0.fc1", "linear", in_features=8, out_features=8).rank == 2
        assert back.decide("dec.12", "linear", in_features=8, out_features=8).method == "dense"
    assert pickle.loads(pickle.dumps(compile_pattern("a.**")))("a.b.c")


def test_converted_model_pickles_with_its_policy():
    # the policy convert attaches to the model held closures, so torch.save(model) failed
    import panther_fx

    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))
    panther_fx.convert(model, {"defaults": {"method": "svd", "rank": 8}, "rule": [{"match": "1", "method": "dense"}]})
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(0))
    for back in (torch.load(buffer, weights_only=False), copy.deepcopy(model)):  # a model built right here
        assert back.panther_policy == model.panther_policy
        torch.testing.assert_close(back(x), model(x), rtol=0, atol=0)


def test_load_policy_none_is_empty():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        policy = load_policy(None)
    assert policy.decide("x", "linear", in_features=8, out_features=8).method == "dense"
