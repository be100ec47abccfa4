"""The policy key ``min_speedup``: the backend times each selected layer dense and rewritten at compile time
and keeps it dense unless the rewritten op is at least that much faster (panther_fx/passes/speed.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from panther_fx.backend import last_report, panther_backend
from panther_fx.passes import speed
from panther_fx.policy import Policy, PolicyError


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = nn.Conv2d(32, 64, 3, padding=1)
        self.fc1 = nn.Linear(64, 256)
        self.fc2 = nn.Linear(256, 256)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5)

    def forward(self, x):
        y = torch.relu(self.conv(x)).mean((2, 3))
        return self.fc2(torch.relu(self.fc1(y)))


def compiled(policy: dict, dynamic: bool = False):
    model = Net().eval().requires_grad_(False)
    x = torch.randn(4, 32, 8, 8, generator=torch.Generator().manual_seed(1))
    fn = torch.compile(model, backend=lambda gm, inputs: panther_backend(gm, inputs, options={"policy": policy, "use_inductor": False}),
                       fullgraph=True, dynamic=dynamic)
    return model, fn, x


def policy(min_speedup: float) -> dict:
    return {"defaults": {"method": "svd", "rank": 0.25, "min_speedup": min_speedup}}


def test_min_speedup_is_validated():
    Policy.load(policy(1.5))
    with pytest.raises(PolicyError, match=r"min_speedup = 0 must be finite and > 0"):
        Policy.load(policy(0))
    with pytest.raises(PolicyError, match=r"min_speedup = '2' must be a float or an integer"):
        Policy.load({"defaults": {"method": "svd", "rank": 8, "min_speedup": "2"}})


def test_unreachable_speedup_keeps_every_layer_dense_with_the_measurement():
    model, fn, x = compiled(policy(1e6))
    with torch.no_grad():
        torch.testing.assert_close(fn(x), model(x), rtol=0, atol=0)  # the dense graph, untouched
    report = last_report()
    assert len(report) == 3 and not report.rewritten
    for row in report:
        assert row.speedup is not None and row.speedup > 0
        assert row.reason.startswith(f"measured {row.speedup:.2f}x dense < min_speedup = 1e+06 (defaults): op ")
        assert "float32 cpu" in row.reason
    assert "speedup ×" in report.table()


def test_reachable_speedup_rewrites_and_reports_the_measurement():
    model, fn, x = compiled(policy(1e-6))
    with torch.no_grad():
        fn(x)
    report = last_report()
    assert {r.path for r in report.rewritten} == {"conv", "fc1", "fc2"}
    assert all(r.speedup is not None and r.reason is None for r in report)


def test_decision_follows_the_measured_ratio(monkeypatch):
    """With a stub clock (the linear pass runs before the conv pass): 2 ms dense / 1 ms op passes
    min_speedup 1.5, 1 ms / 2 ms does not."""
    timings = iter([{"dense": 2.0, "op": 1.0}, {"dense": 1.0, "op": 2.0}, {"dense": 3.0, "op": 1.0}])
    monkeypatch.setattr(speed, "median_ms", lambda fns, device: next(timings))
    _, fn, x = compiled(policy(1.5))
    with torch.no_grad():
        fn(x)
    rows = {r.path: r for r in last_report()}
    assert (rows["fc1"].status, rows["fc1"].speedup) == ("rewritten", 2.0)
    assert (rows["fc2"].status, rows["fc2"].speedup) == ("dense", 0.5)
    assert rows["fc2"].reason.startswith("measured 0.50x dense < min_speedup = 1.5 (defaults): op 2.000 ms, "
                                         "dense 1.000 ms on input (4, 256) float32 cpu")
    assert (rows["conv"].status, rows["conv"].speedup) == ("rewritten", 3.0)


def test_dynamic_shapes_measure_at_the_traced_shape_and_leave_the_global_rng_alone():
    _, fn, x = compiled(policy(1e-6), dynamic=True)
    state = torch.random.get_rng_state()  # after building the model, whose default init draws from it
    with torch.no_grad():
        fn(x)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(r.speedup is not None for r in last_report())


def test_example_shape_uses_the_traced_size_of_dynamic_dims():
    assert speed.example_shape(torch.empty(3, 4)) == (3, 4)
    assert speed.example_shape(None) is None


class Attention(nn.Module):
    """nn.MultiheadAttention and a bare SDPA call with a key-padding mask, each its own attention node."""

    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(32, 4, batch_first=True)

    def forward(self, x, q, k, v, keep):
        a = self.mha(x, x, x, need_weights=False)[0]
        return a.sum() + torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=keep).sum()


@pytest.mark.parametrize("min_speedup", [1e6, 1e-6])
def test_attention_nodes_time_sdpa_against_the_performer_op(min_speedup):
    g = torch.Generator().manual_seed(0)
    x, q, k, v = torch.randn(2, 40, 32, generator=g), *(torch.randn(2, 2, 40, 8, generator=g) for _ in range(3))
    keep = torch.ones(2, 1, 1, 40, dtype=torch.bool)
    keep[1, ..., 30:] = False
    rule = {"match": "**", "op": "attention", "method": "performer", "features": 64, "min_speedup": min_speedup}
    fn = torch.compile(Attention().eval(), fullgraph=True,
                       backend=lambda gm, inputs: panther_backend(gm, inputs, options={"policy": {"rule": [rule]}}))
    with torch.no_grad():
        fn(x, q, k, v, keep)
    rows = [r for r in last_report() if r.op == "attention"]
    assert len(rows) == 2 and all(r.speedup is not None for r in rows)
    if min_speedup > 1:
        assert all(r.status == "dense" and r.reason.startswith("measured ") for r in rows)
        assert {r.reason.split(" on ")[1] for r in rows} == {"q (2, 4, 40, 8) float32, k/v 40 tokens cpu",
                                                             "q (2, 2, 40, 8) float32, k/v 40 tokens cpu"}
    else:
        assert all(r.status == "rewritten" for r in rows)
