"""Candidate retrieval over item embeddings; the only package that imports faiss."""

from __future__ import annotations

import os

# Before faiss loads OpenMP (it reads this once): its worker threads would otherwise spin after every
# parallel search, taking CPU from the event loop on the same cores. At 1M items on 2 cores, PASSIVE raised
# Recommend throughput 28% at 4 calls in flight and 13% at 16, and lowered p99 (docs/PERFORMANCE.md).
# A value set by the operator wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

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
