"""recsvc: a recommender microservice (gRPC, tiered history cache, FAISS retrieval, Triton ranking)."""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["__version__"]
