"""asvd: activation-aware factorization (whitening by chol(XᵀX)), calibration hooks, and the backend path."""

import pytest
import torch
import torch.nn as nn

from panther_fx.backend import last_report, panther_backend
from panther_fx.calibration import calibrate
from panther_fx.linalg import asvd_factors, svd_factors, whitening
from panther_fx.passes import FactorCache
from panther_fx.passes.linear import plan_linear
from panther_fx.policy import Policy


def correlated_inputs(n, dim, generator, dtype=torch.float64):
    """Inputs with a strongly anisotropic covariance (like real activations), so asvd != svd."""
    scales = torch.logspace(0, -3, dim, dtype=dtype)
    mix = torch.linalg.qr(torch.randn(dim, dim, dtype=dtype, generator=generator))[0]
    return (torch.randn(n, dim, dtype=dtype, generator=generator) * scales) @ mix.T + 0.1


def optimal_error(W, X, rank):
    """min over rank-r M of ‖(W - M) Xᵀ‖_F, independently: X = QR, so it is the SVD tail of W Rᵀ."""
    R = torch.linalg.qr(X)[1]
    sigma = torch.linalg.svdvals(W @ R.T)
    return sigma[rank:].square().sum().sqrt()


@pytest.mark.parametrize("shape,rank", [((48, 64), 8), ((80, 40), 20)])
def test_asvd_error_on_calibration_inputs_is_optimal(shape, rank):
    g = torch.Generator().manual_seed(0)
    W = torch.randn(*shape, dtype=torch.float64, generator=g)
    X = correlated_inputs(500, shape[1], g)
    A, B = asvd_factors(W, X.T @ X, rank, damping=1e-12)
    assert A.shape == (shape[0], rank) and B.shape == (rank, shape[1])
    err = ((W - A @ B) @ X.T).norm()
    best = optimal_error(W, X, rank)
    torch.testing.assert_close(err, best, rtol=1e-6, atol=0)
    A_svd, B_svd = svd_factors(W, rank)
    assert ((W - A_svd @ B_svd) @ X.T).norm() > 1.5 * best  # plain svd ignores the inputs


def test_asvd_float32_weight_close_to_float64_reference():
    g = torch.Generator().manual_seed(1)
    W = torch.randn(64, 96, dtype=torch.float64, generator=g)
    X = correlated_inputs(400, 96, g)
    A, B = asvd_factors(W.float(), (X.T @ X).float(), 16)
    assert A.dtype == B.dtype == torch.float32
    err = ((W - (A @ B).double()) @ X.T).norm()
    best = optimal_error(W, X, 16)
    assert err <= best * (1 + 1e-4)


def test_whitening_damping_and_errors():
    G = torch.zeros(4, 4, dtype=torch.float64)
    G[0, 0] = 2.0  # rank-deficient: only damping makes it positive definite
    S = whitening(G, damping=1e-3)
    torch.testing.assert_close(S @ S.T, G + 1e-3 * 0.5 * torch.eye(4, dtype=torch.float64))
    with pytest.raises(ValueError, match="gram is"):
        asvd_factors(torch.randn(3, 5), torch.eye(4), 2)


class Mixer(nn.Module):
    """Takes tokenizer-style keyword batches; padded positions carry large junk values."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(16, 32)
        self.out = nn.Linear(32, 8)

    def forward(self, x, attention_mask):
        return self.out(torch.relu(self.inp(x)))


def test_calibrate_gram_matches_manual_and_skips_padding():
    torch.manual_seed(0)
    model = Mixer()
    x = torch.randn(3, 5, 16)
    mask = torch.ones(3, 5, dtype=torch.long)
    mask[1, 3:] = 0
    x[1, 3:] = 1e3
    batches = [{"x": x[:2], "attention_mask": mask[:2]}, {"x": x[2:], "attention_mask": mask[2:]}]
    grams = calibrate(model, batches)
    assert set(grams) == {"inp", "out"} and grams["inp"].dtype == torch.float64
    rows = x[mask.bool()].double()
    torch.testing.assert_close(grams["inp"], rows.T @ rows)
    hidden = torch.relu(model.inp(x[mask.bool()])).double()
    torch.testing.assert_close(grams["out"], hidden.T @ hidden, rtol=1e-5, atol=1e-6)
    only = calibrate(model, batches, policy={"defaults": {"method": "asvd", "rank": 4, "min_features": 0},
                                             "rule": [{"match": "out", "method": "dense"}]})
    assert set(only) == {"inp"}
    with pytest.raises(ValueError, match="no calibration batches"):
        calibrate(model, [])


def test_calibrate_runs_in_eval_mode_and_restores_each_module_mode():
    model = nn.Sequential(nn.Linear(16, 16), nn.Dropout(0.5), nn.Linear(16, 16), nn.Dropout(0.5))
    model[3].eval()  # a mixed-mode model: every module's own mode comes back
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(8, 16, generator=g) for _ in range(2)]
    grams = calibrate(model, batches)
    assert [m.training for m in model.modules()] == [True, True, True, True, False]
    with torch.no_grad():
        hidden = torch.cat([model[0](x) for x in batches]).double()  # dropout off: what inference sees
    torch.testing.assert_close(grams["2"], hidden.T @ hidden)


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(64, 128)
        self.fc2 = nn.Linear(128, 128)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def test_backend_asvd_uses_calibration_and_reports_weighted_error():
    torch.manual_seed(0)
    model = MLP().eval()
    g = torch.Generator().manual_seed(2)
    calib = [correlated_inputs(64, 64, g, torch.float32) for _ in range(4)]
    grams = calibrate(model, calib)
    policy = {"defaults": {"method": "asvd", "rank": 12, "min_features": 0}}
    compiled = torch.compile(model, backend=panther_backend, fullgraph=True,
                             options={"policy": policy, "calibration": grams, "use_inductor": False})
    x = correlated_inputs(32, 64, g, torch.float32)
    with torch.no_grad():
        y = compiled(x)
        with torch.compiler.set_stance("fail_on_recompile"):
            compiled(x)
    report = {row.path: row for row in last_report()}
    assert {p: r.method for p, r in report.items()} == {"fc1": "asvd", "fc2": "asvd"}
    # Reference: the same model with each weight replaced by its float64 asvd product.
    ref = MLP().double()
    ref.load_state_dict(model.state_dict())
    with torch.no_grad():
        for name in ("fc1", "fc2"):
            layer = getattr(ref, name)
            A, B = asvd_factors(layer.weight, grams[name], 12)
            layer.weight.copy_(A @ B)
            S = whitening(grams[name])
            W = getattr(model, name).weight.double()
            expected = ((W - A @ B) @ S).norm() / (W @ S).norm()
            assert report[name].rel_error == pytest.approx(expected.item(), rel=1e-3)
        torch.testing.assert_close(y.double(), ref(x.double()), rtol=1e-4, atol=1e-4)


def test_asvd_without_calibration_stays_dense_with_reason():
    torch.manual_seed(0)
    model = MLP().eval()
    policy = Policy.load({"defaults": {"method": "asvd", "rank": 12, "min_features": 0}})
    plan = plan_linear("fc1", model.fc1.weight, policy, FactorCache())
    assert plan.factors is None and "calibration" in plan.decision.reason
    plan = plan_linear("fc1", model.fc1.weight, policy, FactorCache(), calibration={"fc2": torch.eye(128)})
    assert plan.factors is None and "no Gram matrix" in plan.decision.reason
    with pytest.raises(TypeError, match="calibrate"):
        plan_linear("fc1", model.fc1.weight, policy, FactorCache(), calibration=[torch.randn(4, 64)])


def test_policy_damping_reaches_asvd_and_the_reported_error():
    g = torch.Generator().manual_seed(3)
    W = torch.randn(24, 32, dtype=torch.float64, generator=g)
    X = correlated_inputs(200, 32, g)
    gram = X.T @ X
    calibration = {"fc": gram}
    default = plan_linear("fc", W, Policy.from_dict({"defaults": {"method": "asvd", "rank": 6}}), FactorCache(),
                          calibration=calibration)
    damped = plan_linear("fc", W, Policy.from_dict({"defaults": {"method": "asvd", "rank": 6, "damping": 0.5}}),
                         FactorCache(), calibration=calibration)
    A, B = asvd_factors(W, gram, 6, damping=0.5)
    torch.testing.assert_close(damped.factors["A"] @ damped.factors["B"], A @ B)
    # A heavy damping weights all input directions alike: a different (worse on X) factorization.
    assert (damped.factors["A"] @ damped.factors["B"] - default.factors["A"] @ default.factors["B"]).norm() > 1e-3
    S = whitening(gram, damping=0.5)
    expected = ((W - A @ B) @ S).norm() / (W @ S).norm()
    assert abs(damped.report.rel_error - expected.item()) < 1e-9

