import sys

from panther_fx.cli.main import main

MODEL = """
import torch.nn as nn

def make():
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
"""


def test_inspect_prints_report_without_compiling(tmp_path, monkeypatch, capsys):
    (tmp_path / "toy_model.py").write_text(MODEL)
    (tmp_path / "p.toml").write_text('[defaults]\nmethod = "svd"\nrank = 0.25\n[[rule]]\nmatch = "2"\nmethod = "dense"\n')
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [str(tmp_path)] + sys.path)
    assert main(["inspect", "toy_model:make", "--policy", "p.toml"]) == 0
    out = capsys.readouterr().out
    assert "1 of 2 layers rewritten" in out and "dense: rule 1: method = 'dense'" in out
    assert "128×64" in out


def test_inspect_user_errors_are_one_line(tmp_path, monkeypatch, capsys):
    (tmp_path / "toy_model.py").write_text(MODEL)
    (tmp_path / "bad.toml").write_text('[[rule]]\nmatch = "a"\nrank = 0\n')
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [str(tmp_path)] + sys.path)
    for argv, message in [
        (["inspect", "toy_model:nope", "--policy", "bad.toml"], "rule 1: rank = 0"),
        (["inspect", "toy_model:nope", "--policy", "missing.toml"], "no policy file 'missing.toml' (shipped policies: "),
        (["inspect", "no_such_module:make", "--policy", "missing.toml"], "no policy file"),
    ]:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err
    (tmp_path / "ok.toml").write_text('[defaults]\nmethod = "svd"\nrank = 4\n')
    assert main(["inspect", "toy_model:nope", "--policy", "ok.toml"]) == 2
    assert "module 'toy_model' has no attribute 'nope'" in capsys.readouterr().err


def test_inspect_model_reports_attention_and_counts_attention_rules():
    import warnings

    from torch import nn

    from panther_fx.passes import inspect_model
    from panther_fx.policy import Policy

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(32, 4, batch_first=True)
            self.self_attention = nn.Identity()  # stands for a module that calls SDPA (HF BertSelfAttention)

    policy = Policy.load({"rule": [{"match": "attn", "op": "attention", "features": 64},
                                   {"match": "self_attention", "op": "attention"}]})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = inspect_model(Block(), policy)
    rows = {r.path: r for r in report}
    assert rows["attn"].status == "rewritten" and rows["attn"].method == "performer" and rows["attn"].rank == 64
    assert rows["attn.out_proj"].status == "dense"
    # A policy that would factor every Linear: MHA's out_proj still stays dense, as in the backend and convert.
    report = inspect_model(Block(), Policy.load({"defaults": {"method": "svd", "rank": 8}}))
    row = {r.path: r for r in report}["attn.out_proj"]
    assert row.status == "dense" and "MHA reads directly" in row.reason
