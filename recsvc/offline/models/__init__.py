"""PyTorch models: the retrieval two-tower, the ranker, training and ONNX export."""

from __future__ import annotations

from recsvc.offline.models.ranker import RankerNet
from recsvc.offline.models.retrieval import RetrievalNet

__all__ = ["RankerNet", "RetrievalNet"]
