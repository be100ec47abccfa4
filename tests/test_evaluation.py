"""The retrieval task on the real MiniLM and Wikipedia assets (skipped when they are not installed)."""

import pytest
import torch

from panther_fx.evaluation import AssetError, RetrievalTask, load_minilm, load_wiki_pairs, retrieval_ranks

try:
    MODEL, TOKENIZER = load_minilm()
    load_wiki_pairs(1)
    MISSING = None
except AssetError as e:  # pragma: no cover - depends on the machine
    MODEL = TOKENIZER = None
    MISSING = f"evaluation assets missing: {e}"
needs_assets = pytest.mark.skipif(MISSING is not None, reason=str(MISSING))


def test_ranks_count_ties_and_non_finite_scores_against_the_model():
    emb = torch.nn.functional.normalize(torch.randn(6, 4, dtype=torch.float64), dim=-1)
    scores = emb @ emb.T
    assert retrieval_ranks(scores).tolist() == [1] * 6
    # every text embedded alike: all pairs tie, so each own document ranks last (it ranked first before)
    assert retrieval_ranks(torch.ones(5, 5)).tolist() == [5] * 5
    # NaN embeddings: every comparison with NaN is false, so '>' counting ranked them first
    assert retrieval_ranks(torch.full((4, 4), float("nan"))).tolist() == [4] * 4
    # one NaN document: its query ranks last; for the other queries it never outranks their own document
    scores[2, :] = float("nan")
    scores[:, 2] = float("nan")
    assert retrieval_ranks(scores).tolist() == [1, 1, 6, 1, 1, 1]
    scores[0, 1] = scores[0, 0]  # one tie
    assert retrieval_ranks(scores)[0] == 2


def test_wiki_pairs_refuse_a_non_positive_count():
    with pytest.raises(ValueError, match="n = -5"):
        load_wiki_pairs(-5)


@needs_assets

def test_pairs_are_deterministic_and_slices_disjoint():
    a = load_wiki_pairs(50, seed=0)
    assert a == load_wiki_pairs(50, seed=0)
    assert a != load_wiki_pairs(50, seed=1)
    b = load_wiki_pairs(50, seed=0, start=50)
    assert not set(a) & set(b)
    assert all(q and d for q, d in a)
    with pytest.raises(ValueError, match="outside"):
        load_wiki_pairs(10, start=10**6)


@needs_assets
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


@needs_assets
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
