"""Candidate retrieval over item embeddings; the only package that imports faiss."""

from __future__ import annotations

from recsvc.retrieval.batching import SearchBatcher
from recsvc.retrieval.faiss_index import FaissRetriever, Retriever

__all__ = ["FaissRetriever", "Retriever", "SearchBatcher"]
