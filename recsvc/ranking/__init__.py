"""Ranking: the Ranker protocol and its backends (Triton over gRPC, in-process ONNX Runtime, a fake).

Only this package imports tritonclient; callers see numpy arrays in and out and ``RankerUnavailable``
for every backend failure.
"""

from __future__ import annotations

from recsvc.ranking.base import PADDING_SCORE, Ranker, check_batch
from recsvc.ranking.fake import FakeRanker, RankCall
from recsvc.ranking.onnx_ranker import OnnxRanker
from recsvc.ranking.triton_channel import TritonChannel, TritonTls
from recsvc.ranking.triton_models import TritonModels
from recsvc.ranking.triton_ranker import TritonRanker

__all__ = [
    "PADDING_SCORE",
    "FakeRanker",
    "OnnxRanker",
    "RankCall",
    "Ranker",
    "TritonChannel",
    "TritonModels",
    "TritonRanker",
    "TritonTls",
    "check_batch",
]
