"""ONNX export of the two networks with the tensor names the bundle format and Triton config use."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from recsvc.models.ranker import RankerNet
from recsvc.models.retrieval import RetrievalNet

__all__ = ["OPSET", "export_query_encoder", "export_ranker"]

# 17 is supported by every ONNX Runtime and TensorRT release we target (TRT 8.6+).
OPSET = 17


def export_query_encoder(model: RetrievalNet, path: Path) -> None:
    """Write HISTORY int64 [B, L] -> QUERY float32 [B, dim]."""
    example = torch.full((2, model.history_len), -1, dtype=torch.int64)
    example[0, -1] = 0
    _export(model, (example,), path, ["HISTORY"], ["QUERY"], {"HISTORY": {0: "batch"}, "QUERY": {0: "batch"}})


def export_ranker(model: RankerNet, history_len: int, num_candidates: int, path: Path) -> None:
    """Write HISTORY int64 [B, L], CANDIDATES int64 [B, C] -> SCORES float32 [B, C] (B, C dynamic)."""
    history = torch.full((2, history_len), -1, dtype=torch.int64)
    history[0, -1] = 0
    candidates = torch.zeros((2, num_candidates), dtype=torch.int64)
    axes = {"HISTORY": {0: "batch"}, "CANDIDATES": {0: "batch", 1: "candidates"},
            "SCORES": {0: "batch", 1: "candidates"}}  # fmt: skip
    _export(model, (history, candidates), path, ["HISTORY", "CANDIDATES"], ["SCORES"], axes)


def _export(
    model: torch.nn.Module,
    args: tuple[torch.Tensor, ...],
    path: Path,
    inputs: list[str],
    outputs: list[str],
    axes: dict[str, dict[int, str]],
) -> None:
    model.eval()
    with warnings.catch_warnings():
        # The TorchScript exporter warns that it is legacy; it needs no extra packages (the dynamo
        # exporter pulls in onnxscript) and produces the plain graphs TensorRT parses best.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, args, str(path), input_names=inputs, output_names=outputs, dynamic_axes=axes,
            opset_version=OPSET, dynamo=False, external_data=False,
        )  # fmt: skip
