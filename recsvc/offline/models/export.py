"""ONNX export of the two networks with the tensor names the bundle format and Triton config use."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from recsvc.offline.models.ranker import RankerNet
from recsvc.offline.models.retrieval import RetrievalNet

__all__ = ["OPSET", "export_onnx", "export_query_encoder", "export_ranker", "export_ranker_torchscript"]

# 17 is supported by every ONNX Runtime and TensorRT release we target (TRT 8.6+).
OPSET = 17


def export_query_encoder(model: RetrievalNet, path: Path) -> None:
    """Write HISTORY int64 [B, L] -> QUERY float32 [B, dim]."""
    example = torch.full((2, model.history_len), -1, dtype=torch.int64)
    example[0, -1] = 0
    export_onnx(model, (example,), path, ["HISTORY"], ["QUERY"], {"HISTORY": {0: "batch"}, "QUERY": {0: "batch"}})


def export_ranker(model: RankerNet, history_len: int, num_candidates: int, path: Path) -> None:
    """Write HISTORY int64 [B, L], CANDIDATES int64 [B, C] -> SCORES float32 [B, C] (B, C dynamic)."""
    history = torch.full((2, history_len), -1, dtype=torch.int64)
    history[0, -1] = 0
    candidates = torch.zeros((2, num_candidates), dtype=torch.int64)
    axes = {"HISTORY": {0: "batch"}, "CANDIDATES": {0: "batch", 1: "candidates"},
            "SCORES": {0: "batch", 1: "candidates"}}  # fmt: skip
    export_onnx(model, (history, candidates), path, ["HISTORY", "CANDIDATES"], ["SCORES"], axes)


def export_ranker_torchscript(model: RankerNet, history_len: int, num_candidates: int, path: Path) -> None:
    """Write a TorchScript trace (ranker.pt): HISTORY int64 [B, L], CANDIDATES int64 [B, C] -> SCORES float32 [B, C].

    What the ``gpu-torch`` target runs (recsvc/repository/model_torch.py); FP32 weights, on the CPU. B and C
    are free, as in the ONNX file; L is fixed by the position weights. Traced rather than scripted because
    ``embed_padded`` takes a module as an argument, which TorchScript cannot compile.
    """
    history = torch.full((2, history_len), -1, dtype=torch.int64)
    history[0, -1] = 0
    candidates = torch.zeros((2, num_candidates), dtype=torch.int64)
    candidates[1, -1] = -1
    # A second shape (other B and C, an empty and a full history) that the trace must also reproduce, so a
    # shape frozen into the graph fails here rather than in Triton.
    check_history = torch.zeros((3, history_len), dtype=torch.int64)
    check_history[1] = -1
    check_candidates = torch.full((3, num_candidates + 3), -1, dtype=torch.int64)
    check_candidates[:, 0] = 0
    model.eval()
    with torch.no_grad(), warnings.catch_warnings():
        # torch 2.13 marks torch.jit deprecated in favour of torch.export; a TorchScript file still loads in
        # any torch a Triton python stub has (torch.jit.load), with no Python class definitions needed there.
        warnings.simplefilter("ignore", DeprecationWarning)
        # The tracer reports a trace that may not generalise (a Python value taken from a tensor, outputs
        # differing on the check inputs) as warnings: an export must not succeed with one.
        warnings.simplefilter("error", torch.jit.TracerWarning)  # type: ignore[attr-defined]  # public, not re-exported
        traced = torch.jit.trace(  # type: ignore[no-untyped-call]
            model, (history, candidates), check_inputs=[(check_history, check_candidates)], check_tolerance=1e-5
        )
        torch.jit.save(traced, str(path))


def export_onnx(
    model: torch.nn.Module,
    args: tuple[torch.Tensor, ...],
    path: Path,
    inputs: list[str],
    outputs: list[str],
    axes: dict[str, dict[int, str]],
) -> None:
    """Export ``model`` with these tensor names and dynamic axes (the bundle's ONNX files all go through here)."""
    model.eval()
    with warnings.catch_warnings():
        # The TorchScript exporter warns that it is legacy; it needs no extra packages (the dynamo
        # exporter pulls in onnxscript) and produces the plain graphs TensorRT parses best.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, args, str(path), input_names=inputs, output_names=outputs, dynamic_axes=axes,
            opset_version=OPSET, dynamo=False, external_data=False,
        )  # fmt: skip
