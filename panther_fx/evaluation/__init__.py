"""Evaluation on real assets: all-MiniLM-L6-v2 on Wikipedia description -> article retrieval."""

from .retrieval import (AssetError, RetrievalResult, RetrievalTask, load_minilm, load_wiki_pairs, minilm_path,
                        retrieval_ranks, wiki_data_dir)

__all__ = ["AssetError", "RetrievalResult", "RetrievalTask", "load_minilm", "load_wiki_pairs", "minilm_path",
           "retrieval_ranks", "wiki_data_dir"]
