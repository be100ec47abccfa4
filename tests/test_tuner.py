"""The autotuner on a small MLP whose layers have different singular-value decays, with an analytic quality:
minus the relative output error against the dense model on fixed inputs."""

from __future__ import annotations

import copy
import sys
import textwrap

import pytest
import torch
from torch import nn

# Before panther_fx.tuner, which imports it: an image without optuna (the GPU machine's) must skip this module,
# not abort the collection of every other test.
optuna = pytest.importorskip("optuna")

import panther_fx
from panther_fx.passes import FactorCache
from panther_fx.policy import Policy
from panther_fx.tuner import (FactoredLinear, SearchSpace, SpaceError, TuneError, auto_ranks, peak_memory_bytes,
                              sensitivity_path, tune)
from panther_fx.tuner.measure import applied
from panther_fx.tuner.search import _unit_errors, _unit_params

DIMS = [128, 256, 256, 256, 128]
DECAYS = [0.02, 0.15, 0.05, 0.3]  # slow, fast, medium, very fast spectral decay


def _spectral(O: int, I: int, decay: float, g: torch.Generator) -> torch.Tensor:
    U, _ = torch.linalg.qr(torch.randn(O, O, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(I, I, generator=g, dtype=torch.float64))
    n = min(O, I)
    s = torch.exp(-decay * torch.arange(n, dtype=torch.float64))
    return (U[:, :n] * s) @ V[:, :n].T


def make_mlp() -> nn.Sequential:
    g = torch.Generator().manual_seed(0)
    layers: list[nn.Module] = []
    for (i, o), decay in zip(zip(DIMS, DIMS[1:]), DECAYS):
        lin = nn.Linear(i, o)
        with torch.no_grad():
            w = _spectral(o, i, decay, g)
            lin.weight.copy_(w / w.norm() * o ** 0.5)
            lin.bias.zero_()
        layers += [lin, nn.Tanh()]
    return nn.Sequential(*layers[:-1])


class OutputError:
    """quality(model) = -‖f(X) - f_dense(X)‖ / ‖f_dense(X)‖ on fixed inputs (0 for the dense model)."""

    def __init__(self, model: nn.Module):
        self.X = torch.randn(256, DIMS[0], generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            self.ref = model(self.X)
        self.calls = 0

    def __call__(self, model: nn.Module) -> float:
        self.calls += 1
        return 0.0 - ((model(self.X) - self.ref).norm() / self.ref.norm()).item()  # 0.0, not -0.0


@pytest.fixture(scope="module")
def mlp():
    return make_mlp()


def _quiet():
    optuna.logging.set_verbosity(optuna.logging.WARNING)


def _uniform(model, evaluate, ranks):
    """(linear params, quality) of {"defaults": {"method": "svd", "rank": r}} for each rank."""
    out, cache = [], FactorCache()
    for r in ranks:
        with applied(model, Policy.load({"defaults": {"method": "svd", "rank": r}}), cache) as report:
            with torch.no_grad():
                out.append((report.params()[1], evaluate(model)))
    return out


# ---- space -----------------------------------------------------------------------------------------------
def test_auto_ranks_are_powers_of_two_below_break_even():
    assert auto_ranks(384, 384) == [32, 64, 128]  # 192 · 768 = 384² is break-even
    assert auto_ranks(384, 1536) == [32, 64, 128, 256]  # 307 · 1920 ≈ 384 · 1536
    assert auto_ranks(8, 8) == [1, 2]  # 4 · 16 = 8² is break-even
    assert auto_ranks(2, 2) == []  # even rank 1 stores 1 · 4 = 2² parameters


def test_space_units_choices_and_errors(mlp):
    space = SearchSpace.build(mlp)
    assert [u.name for u in space.units] == ["0", "2", "4", "6"]
    assert [c.label for c in space.units[0].choices] == ["svd:8", "svd:16", "svd:32", "svd:64", "dense"]
    # "2|4" is a glob without wildcards: it matches nothing -> clear error naming the pattern
    with pytest.raises(SpaceError, match=r"'2\|4' matches no nn.Linear or nn.Conv2d"):
        SearchSpace.build(mlp, {"2|4": [16]})
    group = SearchSpace.build(mlp, {"re:[26]": {"choices": [32, 64, 300], "group": True}, "**": [16]})
    assert [(u.name, u.layers) for u in group.units] == [("re:[26]", ("2", "6")), ("0", ("0",)), ("4", ("4",))]
    assert [c.label for c in group.units[0].choices] == ["svd:32", "svd:64", "dense"]  # 300 > min(I, O) dropped
    for bad, message in [({"**": [0]}, "rank 0 must be >= 1"), ({"**": [1.5]}, "fraction"),
                         ({"**": ["svd"]}, "choice 'svd'"), ({"**": {"choices": [8], "grop": True}}, "grop"),
                         ({"**": [{"method": "sketch"}]}, "low_rank"), ({"a..b": [8]}, "empty path segment")]:
        with pytest.raises(SpaceError, match=message):
            SearchSpace.build(mlp, bad)


def test_policy_of_an_assignment_round_trips_and_decides_each_layer(mlp):
    space = SearchSpace.build(mlp, {"re:[26]": {"choices": [32, "dense"], "group": True}, "**": "auto"})
    assignment = {"re:[26]": "dense", "0": "svd:16", "4": "svd:32"}
    policy = space.policy(assignment)
    again = Policy.load(policy.to_dict())
    assert Policy.from_dict(__import__("tomllib").loads(policy.to_toml())) == again == policy
    decided = {p: policy.decide(p, "linear", in_features=m.in_features, out_features=m.out_features)
               for p, m in mlp.named_modules() if isinstance(m, nn.Linear)}
    assert {p: (d.method, d.rank) for p, d in decided.items()} == {
        "0": ("svd", 16), "2": ("dense", None), "4": ("svd", 32), "6": ("dense", None)}


def test_sensitivity_path_goes_from_mild_to_aggressive(mlp):
    space = SearchSpace.build(mlp)
    errors = _unit_errors(mlp, space, FactorCache())
    path = sensitivity_path(space, errors)
    cost = [sum(_unit_params(u, a[u.name]) for u in space.units) for a in path]
    assert cost == sorted(cost, reverse=True) and len(set(cost)) == len(cost)
    assert path[-1] == {u.name: u.choices[0].label for u in space.units}  # every unit at its cheapest choice
    # the first compressed layer is the one with the fastest decay (layer 6, decay 0.3)
    first = {k: v for k, v in path[0].items() if v != "dense"}
    assert list(first) == ["6"]


def make_cnn() -> nn.Sequential:
    """Two 3×3 convs (one grouped) with low-rank-ish kernels of different decays, then a Linear head."""
    g = torch.Generator().manual_seed(2)
    convs = [nn.Conv2d(16, 64, 3, padding=1), nn.Conv2d(64, 64, 3, padding=1, groups=2)]
    for conv, decay in zip(convs, (0.05, 0.4)):
        O, Cg, kh, kw = conv.weight.shape
        with torch.no_grad():
            w = _spectral(O, Cg * kh * kw, decay, g).float().reshape(conv.weight.shape)
            conv.weight.copy_(w / w.norm() * O ** 0.5)
    return nn.Sequential(convs[0], nn.Tanh(), convs[1], nn.Tanh(), nn.Flatten(), nn.Linear(64 * 8 * 8, 10))


class CnnOutputError(OutputError):
    def __init__(self, model: nn.Module):
        self.X = torch.randn(8, 16, 8, 8, generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            self.ref = model(self.X)
        self.calls = 0


def test_space_covers_conv2d_layers_and_splits_mixed_groups():
    cnn = make_cnn()
    space = SearchSpace.build(cnn)
    assert [(u.name, u.op, u.shapes) for u in space.units] == [
        ("0", "conv2d", ((64, 144),)), ("2", "conv2d", ((64, 288),)), ("5", "linear", ((10, 4096),))]
    mixed = SearchSpace.build(cnn, {"**": {"choices": [8, 16], "group": True}})
    assert [(u.name, u.op, u.layers) for u in mixed.units] == [("** [conv2d]", "conv2d", ("0", "2")),
                                                                ("** [linear]", "linear", ("5",))]
    policy = mixed.policy({"** [conv2d]": "svd:16", "** [linear]": "svd:8"})
    assert [(r.op, r.settings["rank"]) for r in policy.rules] == [("conv2d", 16), ("linear", 8)]
    # rank 16 exceeds the head's min(I, O) = 10: dropped from that unit only
    ranks = SearchSpace.build(cnn, {"**": [8, 16]})
    assert [[c.label for c in u.choices] for u in ranks.units] == [
        ["svd:8", "svd:16", "dense"], ["svd:8", "svd:16", "dense"], ["svd:8", "dense"]]


def test_choice_table_errors_name_the_choice_not_a_rule(mlp):
    with pytest.raises(SpaceError) as e:
        SearchSpace.build(mlp, {"**": [{"method": "svd", "rnak": 4}]})
    assert str(e.value).startswith("space['**']: choice {'method': 'svd', 'rnak': 4}: unknown key 'rnak'")
    assert "rule" not in str(e.value)
    # the allowed keys listed are those a choice may hold, without a rule's 'match' and 'op'
    allowed = str(e.value).split("allowed keys: ")[1].split(", ")
    assert "rank" in allowed and "match" not in allowed and "op" not in allowed
    with pytest.raises(SpaceError, match="holds policy settings, not 'match' or 'op'"):
        SearchSpace.build(mlp, {"**": [{"op": "linear", "rank": 4}]})


def test_asvd_choice_is_refused_because_tune_does_not_calibrate(mlp):
    with pytest.raises(SpaceError, match=r"space\['\*\*'\]: choice .*asvd.* needs calibration"):
        SearchSpace.build(mlp, {"**": [{"method": "asvd", "rank": 8}, "dense"]})
    with pytest.raises(TuneError, match="asvd"):
        tune(mlp, lambda m: 0.0, example_inputs=None, min_quality=-1.0, n_trials=1,
             space={"**": [{"method": "asvd", "rank": 8}, 16]})


def test_tune_compresses_conv2d_layers_and_convert_reproduces_the_trial():
    _quiet()
    cnn = make_cnn()
    evaluate = CnnOutputError(cnn)
    result = tune(cnn, evaluate, example_inputs=None, min_quality=-0.2, n_trials=10, seed=0,
                  space={"re:[02]": "auto"})
    assert result.best.feasible and result.best.layer_params < result.dense.layer_params
    assert all(r.op == "conv2d" for r in result.policy.rules)
    assert result.best.choices["2"] != "dense"  # the fast-decaying conv is compressible
    converted, report = panther_fx.convert(cnn, result.policy, inplace=False)
    assert any(isinstance(m, (panther_fx.nn.LowRankConv2d, panther_fx.nn.SKConv2d)) for m in converted.modules())
    with torch.no_grad():
        assert evaluate(converted) == pytest.approx(result.best.quality, abs=1e-6)
    assert report.params()[1] == result.best.layer_params
    assert all(type(m) in (nn.Conv2d, nn.Tanh, nn.Flatten, nn.Linear, nn.Sequential) for m in cnn.modules())


class _Block(nn.Module):
    def __init__(self, g: torch.Generator):
        super().__init__()
        self.up, self.down = nn.Linear(32, 64), nn.Linear(64, 32)
        with torch.no_grad():  # low-rank-ish weights: rank 8 keeps most of them
            for lin, decay in ((self.up, 0.4), (self.down, 0.3)):
                lin.weight.copy_(_spectral(*lin.weight.shape, decay, g))

    def forward(self, x):
        return self.down(torch.tanh(self.up(x)))


def test_grouped_tuned_policy_converts():
    """A group unit writes a glob rule (``*.**``, op linear) that also covers the blocks themselves and their
    activations: convert applies it to the Linears and reproduces the trial's quality."""
    _quiet()
    g = torch.Generator().manual_seed(4)
    model = nn.Sequential(_Block(g), _Block(g))
    X = torch.randn(64, 32, generator=g)
    with torch.no_grad():
        ref = model(X)

    def evaluate(m):
        return 0.0 - ((m(X) - ref).norm() / ref.norm()).item()

    result = tune(model, evaluate, example_inputs=None, min_quality=-0.3, n_trials=3,
                  space={"*.**": {"choices": [4, 8, "dense"], "group": True}})
    assert [r.match for r in result.policy.rules] == ["*.**"] and result.best.choices["*.**"] != "dense"
    converted, report = panther_fx.convert(model, result.policy, inplace=False)
    assert [r.path for r in report.rewritten] == ["0.up", "0.down", "1.up", "1.down"]
    with torch.no_grad():
        assert evaluate(converted) == pytest.approx(result.best.quality, abs=1e-6)


class _TiedLM(nn.Module):
    """An embedding, a Linear subclass, an encoder layer (MHA with its out_proj) and a head tied to the embedding."""

    class Scaled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(64, 32)
        self.scaled = self.Scaled(32, 32)
        self.layer = nn.TransformerEncoderLayer(32, 2, 64, batch_first=True, dropout=0.0)
        self.head = nn.Linear(32, 64, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(self.layer(self.scaled(self.emb(ids))))


def test_space_leaves_out_layers_convert_cannot_factorize():
    model = _TiedLM()
    space = SearchSpace.build(model)
    assert [u.name for u in space.units] == ["layer.linear1", "layer.linear2"]
    with pytest.raises(SpaceError, match=r"'head' matches no .*head: its weight is shared with 'emb.weight'"):
        SearchSpace.build(model, {"head": [8]})
    # a group rule covers the left-out layers too: the trial leaves them dense, as convert does
    group = SearchSpace.build(model, {"**": {"choices": [8, "dense"], "group": True}})
    policy = group.policy({"**": "svd:8"})
    with applied(model, policy, FactorCache()) as report:
        assert [type(m) for m in (model.scaled, model.layer.self_attn.out_proj, model.head)] == [
            _TiedLM.Scaled, nn.modules.linear.NonDynamicallyQuantizableLinear, nn.Linear]
        rows = {r.path: r for r in report}
    assert {p for p, r in rows.items() if r.status == "rewritten"} == {"layer.linear1", "layer.linear2"}
    assert "shared with 'emb.weight'" in rows["head"].reason and "out_proj" in rows["layer.self_attn.out_proj"].reason
    _, convert_report = panther_fx.convert(model, policy, inplace=False)
    assert convert_report.params() == report.params()
    # the written policy keeps them dense for the backend too, which would factorize the subclass's F.linear
    # and the tied head under the bare group glob
    assert [(r.match, r.settings["method"]) for r in policy.rules] == [
        ("scaled", "dense"), ("head", "dense"), ("**", "svd")]
    frozen = copy.deepcopy(model).requires_grad_(False)  # train mode: no TransformerEncoderLayer fast path
    torch.compile(frozen, backend="panther", options={"policy": policy, "use_inductor": False})(
        torch.randint(0, 64, (2, 5)))
    compiled = {r.path: r.status for r in panther_fx.last_report() if r.op == "linear"}
    assert compiled == {"scaled": "dense", "layer.linear1": "rewritten", "layer.linear2": "rewritten",
                        "head": "dense"}


def test_trials_swap_every_name_of_a_shared_layer():
    """Sequential(lin, act, lin): the trial swapped the first name only, measured a half-dense model and
    counted the dense weight as well as the factors (5184 params, more than dense), unlike convert."""
    _quiet()
    torch.manual_seed(0)
    lin = nn.Linear(64, 64)
    model = nn.Sequential(lin, nn.ReLU(), lin)
    x = torch.randn(32, 64)
    ref = model(x).detach()
    evaluate = lambda m: -float((m(x) - ref).pow(2).mean())  # noqa: E731
    result = tune(model, evaluate, example_inputs=None, min_quality=-1e9, space={"**": [8, "dense"]}, n_trials=2)
    (row,) = [r for r in result.rows if r.choices["0"] == "svd:8"]
    converted, _ = panther_fx.convert(model, result.policy_of(row), inplace=False)
    with torch.no_grad():
        assert row.quality == pytest.approx(evaluate(converted), rel=1e-6)
    assert row.params == sum(p.numel() for p in converted.parameters()) == 8 * 128 + 64


def test_a_layer_its_pattern_left_without_choices_stays_dense_under_a_later_glob():
    """Layer 0 (16x16) has no rank 64: its unit was dropped, and the later group's '**' rule then factorized it."""
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64))
    space = SearchSpace.build(model, {"0": [64, "dense"], "**": {"choices": [4, "dense"], "group": True}})
    assert [u.layers for u in space.units] == [("2", "4")]
    policy = space.policy({"**": "svd:4"})
    decisions = {p: policy.decide(p, "linear", in_features=16, out_features=16).method for p in ("0", "2")}
    assert decisions == {"0": "dense", "2": "svd"}


def test_unit_patterns_match_only_their_layer():
    """A ModuleDict key such as 'w?' is a glob: one unit's choice decided another unit's layer."""
    model = nn.Sequential(nn.ModuleDict({"w?": nn.Linear(64, 64), "wq": nn.Linear(64, 64)}))
    space = SearchSpace.build(model, {"**": [8, "dense"]})
    policy = space.policy({"0.w?": "svd:8", "0.wq": "dense"})
    _, report = panther_fx.convert(model, policy, inplace=False)
    assert {r.path: r.method for r in report} == {"0.w?": "svd", "0.wq": "dense"}


def test_a_nan_dense_quality_stops_at_once():
    _quiet()
    calls = []

    def evaluate(model):
        calls.append(1)
        return float("nan")

    with pytest.raises(TuneError, match=r"evaluate\(dense model\) returned NaN"):
        tune(make_mlp(), evaluate, example_inputs=None, min_quality=0.0, n_trials=5)
    assert len(calls) == 1  # every trial evaluated the dense model again before


def test_tune_a_transformer_layer_and_convert_its_policy():
    _quiet()
    model = _TiedLM().eval()
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = model(ids)

    def evaluate(m):
        return 0.0 - ((m(ids) - ref).norm() / ref.norm()).item()

    result = tune(model, evaluate, example_inputs=None, min_quality=-1.0, n_trials=3)
    assert [r.source for r in result.rows] == ["dense", "guided", "guided"]
    converted, _ = panther_fx.convert(model, result.policy, inplace=False)
    with torch.no_grad():
        assert evaluate(converted.eval()) == pytest.approx(result.best.quality, abs=1e-6)


# ---- search ----------------------------------------------------------------------------------------------
def test_tune_respects_min_quality_and_beats_the_best_uniform_rank(mlp):
    _quiet()
    evaluate = OutputError(mlp)
    min_quality = -0.35
    uniform = _uniform(mlp, evaluate, [8, 16, 32, 64, 128])
    best_uniform = min(p for p, q in uniform if q >= min_quality)
    dense = sum(m.weight.numel() for m in mlp.modules() if isinstance(m, nn.Linear))
    assert best_uniform < dense  # a uniform rank is feasible: a real contest
    before = {k: v.clone() for k, v in mlp.state_dict().items()}

    result = tune(mlp, evaluate, example_inputs=None, min_quality=min_quality, n_trials=14, seed=0)

    assert len(result.rows) == 14 and result.dense.quality == 0.0
    assert result.best.feasible and result.best.quality >= min_quality
    assert all(r.feasible == (r.quality >= min_quality) for r in result.rows)
    assert any(not r.feasible for r in result.rows)  # the search went past the boundary
    assert result.best.layer_params < best_uniform
    # the policy it returns reproduces the measured quality through convert, on a copy
    converted, _ = panther_fx.convert(mlp, result.policy, inplace=False)
    with torch.no_grad():
        assert evaluate(converted) == pytest.approx(result.best.quality, abs=1e-6)
    # the user's model is untouched
    assert all(isinstance(m, (nn.Linear, nn.Tanh, nn.Sequential)) for m in mlp.modules())
    assert all(torch.equal(before[k], v) for k, v in mlp.state_dict().items())


def test_tuned_policy_file_drives_the_backend_like_the_trial(mlp, tmp_path):
    _quiet()
    evaluate = OutputError(mlp)
    result = tune(mlp, evaluate, example_inputs=None, min_quality=-0.1, n_trials=6)
    assert result.best.layer_params < result.dense.layer_params
    path = result.write(tmp_path / "tuned.toml")
    frozen = make_mlp().requires_grad_(False)
    compiled = torch.compile(frozen, backend=panther_fx.panther_backend, fullgraph=True,
                             options={"policy": str(path), "use_inductor": False})
    with torch.no_grad():
        assert evaluate(compiled) == pytest.approx(result.best.quality, abs=1e-6)
    rewritten = {r.path: r.rank for r in panther_fx.last_report().rewritten}
    assert rewritten == {p: int(label.split(":")[1]) for p, label in result.best.choices.items() if label != "dense"}


def test_result_write_table_and_pareto(mlp, tmp_path):
    _quiet()
    result = tune(mlp, OutputError(mlp), example_inputs=None, min_quality=-0.1, n_trials=8)
    path = result.write(tmp_path / "tuned.toml")
    assert Policy.load(path) == result.policy
    assert path.read_text().startswith("# written by panther_fx.tune")
    table = result.table()
    assert "quality" in table and "weights kept" in table and table.count("\n") == len(result.rows) + 1
    front = result.pareto()
    assert front and [r.params for r in front] == sorted(r.params for r in front)
    for r in front:  # nothing beats a front member on both axes
        assert not any(o.quality > r.quality and o.params < r.params for o in result.rows)
    assert result.best in front


def test_resume_from_sqlite_continues_the_same_study(mlp, tmp_path):
    _quiet()
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    evaluate = OutputError(mlp)
    first = tune(mlp, evaluate, example_inputs=None, min_quality=-0.1, n_trials=3, storage=storage,
                 study_name="mlp")
    second = tune(mlp, evaluate, example_inputs=None, min_quality=-0.1, n_trials=4, storage=storage,
                  study_name="mlp")
    assert len(first.rows) == 3 and len(second.rows) == 7
    assert [r.source for r in second.rows].count("dense") == 1  # the dense reference is not re-run
    loaded = optuna.load_study(study_name="mlp", storage=storage)
    assert len(loaded.trials) == 7
    with pytest.raises(TuneError, match="another search space"):
        tune(mlp, evaluate, example_inputs=None, min_quality=-0.1, n_trials=1, storage=storage,
             study_name="mlp", space={"0": [8]})
    # another model with the same layer names and choices: its shapes differ, so it is another space too
    other = nn.Sequential(nn.Linear(128, 128), *list(mlp)[1:])
    spaces = [SearchSpace.build(m, {"0": [8, "dense"]}) for m in (mlp, other)]
    assert [[c.label for c in s.units[0].choices] for s in spaces] == [["svd:8", "dense"]] * 2
    assert spaces[0].signature() != spaces[1].signature()


def test_ctrl_c_leaves_a_valid_study_and_the_best_policy_so_far(mlp, tmp_path):
    _quiet()
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    inner = OutputError(mlp)

    def evaluate(model):
        if inner.calls == 4:
            raise KeyboardInterrupt
        return inner(model)

    with pytest.warns(RuntimeWarning, match="interrupted"):
        result = tune(mlp, evaluate, example_inputs=None, min_quality=-0.1, n_trials=10, storage=storage,
                      study_name="s")
    assert result.interrupted and len(result.rows) == 4 and result.best.feasible
    states = [t.state for t in optuna.load_study(study_name="s", storage=storage).trials]
    assert states.count(optuna.trial.TrialState.COMPLETE) == 4 and states[-1] == optuna.trial.TrialState.FAIL
    inner.calls = 100  # resumes past the failed trial
    resumed = tune(mlp, evaluate, example_inputs=None, min_quality=-0.1, n_trials=2, storage=storage,
                   study_name="s")
    assert len(resumed.rows) == 6 and not resumed.interrupted


def test_nan_quality_is_a_failed_infeasible_trial(mlp):
    _quiet()
    inner = OutputError(mlp)

    def evaluate(model):  # compressing the last layer "breaks" the model
        return float("nan") if isinstance(model[6], FactoredLinear) else inner(model)

    with pytest.warns(RuntimeWarning, match="evaluated to NaN"):
        result = tune(mlp, evaluate, example_inputs=None, min_quality=-0.35, n_trials=12)
    failed = [t for t in result.study.trials if t.state == optuna.trial.TrialState.FAIL]
    assert failed and len(failed) + len(result.rows) == 12
    proposed = [tuple(sorted(t.params.items())) for t in failed if t.user_attrs["source"] != "sampler"]
    assert proposed and len(set(proposed)) == len(proposed)  # the guided steps never retry a NaN candidate
    assert result.best.choices["6"] == "dense" and result.best.layer_params < result.dense.layer_params


@pytest.mark.parametrize("seed", ["abc", 1.5, True])
def test_seed_must_be_an_integer(mlp, seed):
    with pytest.raises(TuneError, match=f"seed = {seed!r} must be an integer"):
        tune(mlp, lambda m: 0.0, example_inputs=None, min_quality=-1.0, n_trials=1, seed=seed)


def test_study_name_must_be_a_string(mlp):
    with pytest.raises(TuneError, match="study_name = 5 must be a string"):
        tune(mlp, lambda m: 0.0, example_inputs=None, min_quality=-1.0, n_trials=1, study_name=5)


def test_a_bare_layer_is_refused_before_any_trial():
    calls = []
    for layer in (nn.Linear(64, 64), nn.Conv2d(8, 8, 3)):
        with pytest.raises(TuneError, match=f"the model itself is a {type(layer).__name__} layer: wrap it"):
            tune(layer, lambda m: calls.append(m) or 0.0, example_inputs=None, min_quality=-1.0, n_trials=2)
    assert not calls


def test_latency_and_memory_objectives_measure_the_candidate(mlp):
    _quiet()
    x = torch.randn(32, DIMS[0])
    result = tune(mlp, OutputError(mlp), example_inputs=(x,), min_quality=-0.35, objective="memory", n_trials=5)
    assert all(r.latency_ms > 0 and r.memory_bytes > 0 for r in result.rows)
    assert result.best.memory_bytes < result.dense.memory_bytes
    assert result.best.cost("memory") == min(r.memory_bytes for r in result.rows if r.feasible)


def test_peak_memory_counts_weights_and_live_activations():
    model = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 32))
    x = torch.randn(16, 64)
    weights = sum(p.numel() * 4 for p in model.parameters())
    # peak while GELU runs: the first Linear's output and GELU's output, 16 × 256 float32 each
    assert peak_memory_bytes(model, (x,)) == weights + 2 * 16 * 256 * 4


@pytest.mark.parametrize("kwargs, message", [
    ({"objective": "speed"}, "objective = 'speed' must be one of params, latency, memory"),
    ({"n_trials": 0}, "n_trials = 0 must be an integer >= 1"),
    ({"min_quality": "high"}, "min_quality = 'high' must be a number"),
    ({"storage": "study.db"}, "Optuna RDB URL"),
    ({"objective": "latency"}, "pass example_inputs"),
    ({"min_quality": 0.5}, "unreachable: the dense model scores 0"),
    ({"space": {"nothing.here": [8]}}, "'nothing.here' matches no nn.Linear or nn.Conv2d"),
])
def test_bad_arguments_give_clear_errors(mlp, kwargs, message):
    _quiet()
    args = {"example_inputs": None, "min_quality": -0.1, "n_trials": 2, **kwargs}
    with pytest.raises(TuneError, match=message.replace("(", r"\(").replace(")", r"\)")):
        tune(mlp, OutputError(mlp), **args)


def test_bad_model_and_evaluate(mlp):
    with pytest.raises(TuneError, match="model must be an nn.Module"):
        tune("mlp", OutputError(mlp), example_inputs=None, min_quality=0)
    with pytest.raises(TuneError, match="evaluate must be a callable"):
        tune(mlp, 0.5, example_inputs=None, min_quality=0)
    with pytest.raises(TuneError, match="must return a number"):
        tune(mlp, lambda m: "good", example_inputs=None, min_quality=0, n_trials=1)


# ---- CLI -------------------------------------------------------------------------------------------------
def test_cli_tune_writes_a_policy(tmp_path, monkeypatch, capsys):
    from panther_fx.cli.main import main

    (tmp_path / "tunecase.py").write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(__import__('pathlib').Path(__file__).parent)!r})
        from test_tuner import OutputError, make_mlp
        MODEL = make_mlp()
        evaluate = OutputError(MODEL)
        def make_model():
            return MODEL
    """))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    _quiet()
    out = tmp_path / "policy.toml"
    code = main(["tune", "tunecase:make_model", "--eval", "tunecase:evaluate", "--min-quality", "-0.1",
                 "--trials", "4", "--out", str(out), "--storage", f"sqlite:///{tmp_path / 's.db'}"])
    assert code == 0 and Policy.load(out).rules
    assert "best: trial" in capsys.readouterr().out
    code = main(["tune", "tunecase:make_model", "--eval", "tunecase:evaluate", "--min-quality", "1",
                 "--trials", "2", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bar: one line, no traceback
    assert code == 2 and err.startswith("panther-fx tune: error: min_quality = 1 is unreachable")
    sys.modules.pop("tunecase", None)


# ---- CUDA ------------------------------------------------------------------------------------------------
@pytest.mark.cuda
def test_cuda_peak_memory_uses_allocator_statistics():
    model = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 32)).cuda()
    x = torch.randn(16, 64, device="cuda")
    with torch.no_grad():
        model(x)  # cuBLAS workspaces are allocated on first use and then stay resident
    weights = sum(p.numel() * 4 for p in model.parameters())
    live = 2 * 16 * 256 * 4  # the first Linear's and GELU's outputs (multiples of the 512-byte block)
    peak = peak_memory_bytes(model, (x,))
    assert weights + live <= peak < weights + live + 2**20


@pytest.mark.cuda
def test_cuda_tune_latency_objective():
    _quiet()
    model = make_mlp().cuda()
    X = torch.randn(256, DIMS[0], device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    with torch.no_grad():
        ref = model(X)

    def quality(m):
        return 0.0 - ((m(X) - ref).norm() / ref.norm()).item()

    result = tune(model, quality, example_inputs=(X,), min_quality=-0.35, objective="latency", n_trials=6)
    assert all(r.latency_ms > 0 and r.memory_bytes > 0 for r in result.rows)
    assert result.best.feasible and result.best.latency_ms == min(r.latency_ms for r in result.rows if r.feasible)
