"""The retrieval task on the real MiniLM and Wikipedia assets (skipped when they are not installed)."""

import pytest
import torch

from panther_fx.evaluation import AssetError, RetrievalTask, load_minilm, load_wiki_pairs

try:
    MODEL, TOKENIZER = load_minilm()
    load_wiki_pairs(1)
except AssetError as e:  # pragma: no cover - depends on the machine
    pytest.skip(f"evaluation assets missing: {e}", allow_module_level=True)


def test_pairs_are_deterministic_and_slices_disjoint():
    a = load_wiki_pairs(50, seed=0)
    assert a == load_wiki_pairs(50, seed=0)
    assert a != load_wiki_pairs(50, seed=1)
    b = load_wiki_pairs(50, seed=0, start=50)
    assert not set(a) & set(b)
    assert all(q and d for q, d in a)
    with pytest.raises(ValueError, match="outside"):
        load_wiki_pairs(10, start=10**6)


def test_dense_minilm_retrieves_and_matches_itself():
    pairs = load_wiki_pairs(100, seed=0)
    task = RetrievalTask(TOKENIZER, pairs, max_length=48, batch_size=50)
    dense = task.evaluate(MODEL)
    # 100 candidates: the real model finds most articles from their description; a broken pooling or a
    # shuffled embedding order gives ~1/100.
    assert dense.recall_at_1 > 0.7 and dense.mrr > dense.recall_at_1 - 1e-6
    assert dense.mean_cosine is None and dense.n == 100
    emb = dense.embeddings
    assert torch.allclose(emb.queries.norm(dim=-1), torch.ones(100), atol=1e-5)
    # Embeddings do not depend on batching/padding: one text embedded alone gives the same vector.
    alone = task.embed(MODEL, [pairs[3][1]])
    torch.testing.assert_close(alone[0], emb.documents[3], atol=1e-4, rtol=0)
    again = task.evaluate(MODEL, reference=emb)
    assert again.mean_cosine == pytest.approx(1.0, abs=1e-5)
    assert again.recall_at_1 == dense.recall_at_1


def test_mean_cosine_drops_for_a_perturbed_model():
    pairs = load_wiki_pairs(40, seed=0)
    task = RetrievalTask(TOKENIZER, pairs, max_length=32)
    ref = task.embeddings(MODEL)
    linear = MODEL.encoder.layer[0].intermediate.dense
    saved = linear.weight.detach().clone()
    try:
        with torch.no_grad():
            linear.weight.mul_(0.0)
        res = task.evaluate(MODEL, reference=ref)
    finally:
        with torch.no_grad():
            linear.weight.copy_(saved)
    assert res.mean_cosine < 0.999
