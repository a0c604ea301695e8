"""A tiny, exactly reproducible ranker and query encoder for tests and smoke runs.

Both models share one embedding table ``E`` [num_items, dim]: the query is the mean of the embeddings of
the valid (non-padding) history items, and a candidate's score is the dot product of its embedding with
that query. They are built directly with ``onnx.helper`` rather than exported from torch, so they need no
training, are bit-for-bit deterministic for a given table, and ``reference_scores`` computes the same
numbers in numpy to check any server against.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
from onnx import TensorProto, helper, numpy_helper

from recsvc.ranking.base import PADDING_SCORE

__all__ = [
    "PADDING_SCORE",
    "random_embeddings",
    "reference_query",
    "reference_scores",
    "write_tiny_query_encoder",
    "write_tiny_ranker",
]

# 17 matches recsvc.offline.models.export, so the tiny model exercises the same runtime paths as real bundles.
_OPSET = 17


def random_embeddings(num_items: int, dim: int, *, seed: int = 0) -> npt.NDArray[np.float32]:
    """Return a float32 [num_items, dim] table with small values, so float32 sums stay well-conditioned."""
    rng = np.random.default_rng(seed)
    return rng.normal(0.0, 0.5, size=(num_items, dim)).astype(np.float32)


def reference_query(embeddings: npt.NDArray[np.float32], history: npt.NDArray[np.int64]) -> npt.NDArray[np.float32]:
    """Compute the query encoder in numpy: the mean embedding of the valid history items, float32 [B, dim]."""
    valid = (history >= 0).astype(np.float32)  # [B, L]
    gathered = embeddings[np.maximum(history, 0)]  # [B, L, D]
    summed = (gathered * valid[:, :, None]).sum(axis=1)  # [B, D]
    count = np.maximum(valid.sum(axis=1, keepdims=True), 1.0)  # [B, 1]
    query: npt.NDArray[np.float32] = (summed / count).astype(np.float32)
    return query


def reference_scores(
    embeddings: npt.NDArray[np.float32], history: npt.NDArray[np.int64], candidates: npt.NDArray[np.int64]
) -> npt.NDArray[np.float32]:
    """Compute the ranker in numpy: float32 [B, C], PADDING_SCORE where a candidate is -1."""
    query = reference_query(embeddings, history)  # [B, D]
    cand = embeddings[np.maximum(candidates, 0)]  # [B, C, D]
    scores = np.einsum("bcd,bd->bc", cand, query)
    return np.where(candidates >= 0, scores, np.float32(PADDING_SCORE)).astype(np.float32)


def write_tiny_query_encoder(path: Path, embeddings: npt.NDArray[np.float32]) -> None:
    """Write HISTORY int64 [B, L] -> QUERY float32 [B, dim] (B and L dynamic)."""
    nodes, _ = _query_nodes()
    graph = helper.make_graph(
        nodes,
        "tiny_query_encoder",
        [helper.make_tensor_value_info("HISTORY", TensorProto.INT64, ["batch", "history"])],
        [helper.make_tensor_value_info("QUERY", TensorProto.FLOAT, ["batch", embeddings.shape[1]])],
        _initializers(embeddings, ranker=False),
    )
    _save(graph, path)


def write_tiny_ranker(path: Path, embeddings: npt.NDArray[np.float32]) -> None:
    """Write HISTORY int64 [B, L], CANDIDATES int64 [B, C] -> SCORES float32 [B, C] (all dims dynamic)."""
    nodes, query = _query_nodes()
    nodes += [
        helper.make_node("Max", ["CANDIDATES", "zero_i"], ["c_idx"]),
        helper.make_node("Gather", ["E", "c_idx"], ["c_emb"], axis=0),  # [B, C, D]
        helper.make_node("Unsqueeze", [query, "axis2"], ["q3"]),  # [B, D, 1]
        helper.make_node("MatMul", ["c_emb", "q3"], ["s3"]),  # [B, C, 1]
        helper.make_node("Squeeze", ["s3", "axis2"], ["raw"]),  # [B, C]
        helper.make_node("Greater", ["CANDIDATES", "minus_one"], ["c_valid"]),
        helper.make_node("Where", ["c_valid", "raw", "pad_score"], ["SCORES"]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_ranker",
        [
            helper.make_tensor_value_info("HISTORY", TensorProto.INT64, ["batch", "history"]),
            helper.make_tensor_value_info("CANDIDATES", TensorProto.INT64, ["batch", "candidates"]),
        ],
        [helper.make_tensor_value_info("SCORES", TensorProto.FLOAT, ["batch", "candidates"])],
        _initializers(embeddings, ranker=True),
    )
    _save(graph, path)


def _query_nodes() -> tuple[list[onnx.NodeProto], str]:
    """Nodes computing the mean valid history embedding from HISTORY; returns (nodes, output name)."""
    nodes = [
        helper.make_node("Greater", ["HISTORY", "minus_one"], ["h_valid"]),
        helper.make_node("Cast", ["h_valid"], ["h_mask"], to=TensorProto.FLOAT),  # [B, L]
        # Gather treats -1 as "last row", so padding is clamped to 0 and masked out afterwards.
        helper.make_node("Max", ["HISTORY", "zero_i"], ["h_idx"]),
        helper.make_node("Gather", ["E", "h_idx"], ["h_emb"], axis=0),  # [B, L, D]
        helper.make_node("Unsqueeze", ["h_mask", "axis2"], ["h_mask3"]),  # [B, L, 1]
        helper.make_node("Mul", ["h_emb", "h_mask3"], ["h_masked"]),
        helper.make_node("ReduceSum", ["h_masked", "axis1"], ["h_sum"], keepdims=0),  # [B, D]
        helper.make_node("ReduceSum", ["h_mask", "axis1"], ["h_cnt"], keepdims=1),  # [B, 1]
        helper.make_node("Max", ["h_cnt", "one_f"], ["h_cnt1"]),
        helper.make_node("Div", ["h_sum", "h_cnt1"], ["QUERY"]),
    ]
    return nodes, "QUERY"


def _initializers(embeddings: npt.NDArray[np.float32], *, ranker: bool) -> list[onnx.TensorProto]:
    table = np.ascontiguousarray(embeddings, dtype=np.float32)
    if table.ndim != 2:
        raise ValueError(f"embeddings must be 2-D [num_items, dim], got shape {table.shape}")
    constants: dict[str, npt.NDArray[Any]] = {
        "zero_i": np.array(0, dtype=np.int64),
        "minus_one": np.array(-1, dtype=np.int64),
        "one_f": np.array(1.0, dtype=np.float32),
        "axis1": np.array([1], dtype=np.int64),
        "axis2": np.array([2], dtype=np.int64),
    }
    if ranker:
        constants["pad_score"] = np.array(PADDING_SCORE, dtype=np.float32)
    return [numpy_helper.from_array(table, "E")] + [
        numpy_helper.from_array(value, name) for name, value in constants.items()
    ]


def _save(graph: onnx.GraphProto, path: Path) -> None:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", _OPSET)])
    # ONNX Runtime releases lag the newest IR; 8 is what opset 17 shipped with and every runtime reads it.
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
