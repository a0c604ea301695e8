"""Candidate retrieval over item embeddings; the only package that imports faiss."""

from __future__ import annotations

from recsvc.retrieval.backends import FaissBackend, TorchBackend
from recsvc.retrieval.index_build import IndexMeta, IndexSpec, build_and_tune, read_index, write_index
from recsvc.retrieval.retriever import IndexRetriever, Retriever, open_retriever

__all__ = [
    "FaissBackend",
    "IndexMeta",
    "IndexRetriever",
    "IndexSpec",
    "Retriever",
    "TorchBackend",
    "build_and_tune",
    "open_retriever",
    "read_index",
    "write_index",
]
