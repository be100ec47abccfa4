"""torch.export of converted models: the panther ops stay single nodes (also after run_decompositions), and a
saved program loads and runs in a fresh process after ``import panther_fx``."""

import subprocess
import sys
import textwrap

import torch
from safetensors.torch import load_file, save_file
from torch import nn

import panther_fx

POLICY = {"defaults": {"method": "svd", "rank": 8, "min_features": 16},
          "rule": [{"match": "0", "method": "sketch", "num_terms": 2, "low_rank": 3}]}
PANTHER_OPS = {torch.ops.panther.sketched_linear.default, torch.ops.panther.lowrank_linear.default}


def converted_mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 48), nn.GELU(), nn.Linear(48, 32), nn.Linear(32, 4))
    panther_fx.convert(model, POLICY)
    return model.eval()


def panther_targets(ep):
    return [n.target for n in ep.graph.nodes if n.op == "call_function" and n.target in PANTHER_OPS]


def test_export_keeps_panther_ops_and_numerics():
    model = converted_mlp()
    x = torch.randn(5, 32)
    ep = torch.export.export(model, (x,))
    assert panther_targets(ep) == [torch.ops.panther.sketched_linear.default, torch.ops.panther.lowrank_linear.default]
    torch.testing.assert_close(ep.module()(x), model(x))
    decomposed = ep.run_decompositions()
    assert len(panther_targets(decomposed)) == 2
    torch.testing.assert_close(decomposed.module()(x), model(x))


def test_export_with_dynamic_batch():
    model = converted_mlp()
    batch = torch.export.Dim("batch", min=2)
    ep = torch.export.export(model, (torch.randn(4, 32),), dynamic_shapes=({0: batch},))
    x = torch.randn(9, 32)
    torch.testing.assert_close(ep.module()(x), model(x))


def test_export_converted_bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=4, intermediate_size=128,
                        vocab_size=100, max_position_embeddings=32, attn_implementation="sdpa")
    model = BertModel(config).eval()
    panther_fx.convert(model, {"defaults": {"method": "svd", "rank": 16, "min_features": 64}})
    ids = torch.randint(0, 100, (2, 10))
    ep = torch.export.export(model, (ids,))
    assert len(panther_targets(ep)) == 7  # q, k, v, attention output, intermediate, output, pooler
    torch.testing.assert_close(ep.module()(ids).last_hidden_state, model(ids).last_hidden_state)


def test_saved_program_loads_in_a_fresh_process_after_import(tmp_path):
    model = converted_mlp()
    x = torch.randn(3, 32)
    torch.export.save(torch.export.export(model, (x,)), tmp_path / "model.pt2")
    save_file({"x": x, "expected": model(x).detach()}, str(tmp_path / "io.safetensors"))
    script = textwrap.dedent(f"""
        import panther_fx  # registers torch.ops.panther.* before the program is deserialized
        import torch
        from safetensors.torch import load_file, save_file
        io = load_file({str(tmp_path / "io.safetensors")!r})
        ep = torch.export.load({str(tmp_path / "model.pt2")!r})
        save_file({{"out": ep.module()(io["x"])}}, {str(tmp_path / "out.safetensors")!r})
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    torch.testing.assert_close(load_file(str(tmp_path / "out.safetensors"))["out"], model(x), rtol=0, atol=0)
