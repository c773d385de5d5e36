"""Adaptive retrieval: an on-disk embedding store, exact reference search, the Matryoshka funnel
index (shortlist on a small prefix, rerank on larger ones) and its auto-tuner.

numpy only at import; FAISS and torch are imported where used.
"""

from mrl.retrieval.exact import exact_search
from mrl.retrieval.funnel.index import MatryoshkaIndex, SearchConfig, SearchResult, funnel_stages
from mrl.retrieval.store import EmbeddingStore

__all__ = [
    "EmbeddingStore",
    "MatryoshkaIndex",
    "SearchConfig",
    "SearchResult",
    "exact_search",
    "funnel_stages",
]
