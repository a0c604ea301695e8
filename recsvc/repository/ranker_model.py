"""Triton python-backend model that serves a bundle's ``ranker.onnx`` with ONNX Runtime on CPU.

``recsvc publish`` copies this file into every version directory as ``model.py``. It runs inside
Triton's python stub, not in recsvc, so it imports nothing from recsvc and only numpy, onnxruntime and
Triton's ``triton_python_backend_utils``.

Layout it expects (``args["model_repository"]`` is the model directory)::

    <model>/<version>/model.py
    <model>/<version>/model.onnx             HISTORY, CANDIDATES int64 -> SCORES float32
    <model>/<version>/bundle/manifest.json   num_items, history_len, num_candidates (optional)

Triton's dynamic batcher hands ``execute`` several requests at once; requests whose shapes agree are
concatenated into one ONNX Runtime run, which is where batching pays on CPU. A bad request gets an
error response of its own instead of failing the others or the model.

Thread budgets are the server's job: ``TritonServer`` starts Triton (and so this stub) with
``OPENBLAS_NUM_THREADS=1`` because numpy is imported by Triton's utilities before this file runs, and
ONNX Runtime's threads come from the ``ORT_INTRA_OP_THREADS`` parameter of config.pbtxt.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
import triton_python_backend_utils as pb_utils

__all__ = ["TritonPythonModel"]

_INPUTS = ("HISTORY", "CANDIDATES")
# (request index, HISTORY, CANDIDATES) of one valid request
_Member = tuple[int, npt.NDArray[np.int64], npt.NDArray[np.int64]]
_OUTPUT = "SCORES"


def _parameter(config: dict[str, Any], key: str, default: str) -> str:
    value = config.get("parameters", {}).get(key, {}).get("string_value", "")
    return str(value) if value != "" else default


class TritonPythonModel:
    """One ONNX Runtime session per model instance."""

    def initialize(self, args: dict[str, str]) -> None:
        """Open model.onnx of this version with the thread budget from the config's parameters."""
        config = json.loads(args["model_config"])
        version_dir = Path(args["model_repository"]) / args["model_version"]
        self.name = f"{args.get('model_name', 'ranker')} v{args['model_version']}"

        options = ort.SessionOptions()
        options.intra_op_num_threads = int(_parameter(config, "ORT_INTRA_OP_THREADS", "1"))
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        # Spinning workers burn a core each between requests; on a shared CPU box that costs more than
        # the microseconds it saves.
        spinning = _parameter(config, "ORT_ALLOW_SPINNING", "0")
        options.add_session_config_entry("session.intra_op.allow_spinning", spinning)
        self.session = ort.InferenceSession(
            str(version_dir / "model.onnx"), sess_options=options, providers=["CPUExecutionProvider"]
        )

        # Fixed model dims (an int in the ONNX shape) are checked per request for a clear error message.
        shapes = {i.name: i.shape for i in self.session.get_inputs()}
        missing = [name for name in _INPUTS if name not in shapes]
        if missing:
            raise ValueError(f"{self.name}: model.onnx lacks inputs {missing}; has {sorted(shapes)}")
        self.fixed_dims = {name: (shapes[name][1] if isinstance(shapes[name][1], int) else None) for name in _INPUTS}

        self.num_items: int | None = None
        manifest_path = version_dir / "bundle" / "manifest.json"
        if manifest_path.is_file():
            manifest = json.loads(manifest_path.read_text())
            self.num_items = int(manifest["num_items"])
            # ORT allocates its buffers on the first run; do it now, not in the first user's request.
            history = np.full((1, int(manifest["history_len"])), -1, dtype=np.int64)
            candidates = np.full((1, int(manifest["num_candidates"])), -1, dtype=np.int64)
            self.session.run([_OUTPUT], {"HISTORY": history, "CANDIDATES": candidates})

    def _read(self, request: Any) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        """Return the request's two inputs, checked; raise ValueError with a message for the caller."""
        arrays = []
        for name in _INPUTS:
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is None:
                raise ValueError(f"input {name} is missing")
            array = tensor.as_numpy()
            if array.dtype != np.int64 or array.ndim != 2:
                raise ValueError(f"input {name} must be int64 [B, N], got {array.dtype} {list(array.shape)}")
            fixed = self.fixed_dims[name]
            if fixed is not None and array.shape[1] != fixed:
                raise ValueError(f"input {name} must have {fixed} columns for this model, got {array.shape[1]}")
            if array.size and (array.min() < -1 or (self.num_items is not None and array.max() >= self.num_items)):
                raise ValueError(
                    f"input {name} has item ids outside [-1, {self.num_items}): min {array.min()}, max {array.max()}"
                )
            arrays.append(array)
        history, candidates = arrays
        if history.shape[0] != candidates.shape[0]:
            raise ValueError(f"HISTORY has {history.shape[0]} rows but CANDIDATES has {candidates.shape[0]}")
        return history, candidates

    def execute(self, requests: list[Any]) -> list[Any]:
        """Answer every request, in order; one ORT run per group of requests with equal shapes."""
        responses: list[Any] = [None] * len(requests)
        groups: dict[tuple[int, int], list[_Member]] = {}
        for index, request in enumerate(requests):
            try:
                history, candidates = self._read(request)
            except ValueError as exc:
                responses[index] = _error(str(exc), invalid=True)
                continue
            groups.setdefault((history.shape[1], candidates.shape[1]), []).append((index, history, candidates))

        for members in groups.values():
            history = np.concatenate([m[1] for m in members]) if len(members) > 1 else members[0][1]
            candidates = np.concatenate([m[2] for m in members]) if len(members) > 1 else members[0][2]
            try:
                (scores,) = self.session.run([_OUTPUT], {"HISTORY": history, "CANDIDATES": candidates})
                scores = np.ascontiguousarray(scores, dtype=np.float32)
                if scores.shape != (history.shape[0], candidates.shape[1]):
                    raise ValueError(f"model returned SCORES {list(scores.shape)}")
            except Exception as exc:  # noqa: BLE001 - ORT's exception types have no stable importable name
                for index, _, _ in members:
                    responses[index] = _error(f"{self.name}: inference failed: {exc}", invalid=False)
                continue
            start = 0
            for index, h, _ in members:
                rows = h.shape[0]
                part = scores[start : start + rows]
                start += rows
                responses[index] = pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(_OUTPUT, part)])
        return responses

    def finalize(self) -> None:
        """Drop the session so its memory is released before the stub exits."""
        self.session = None


def _error(message: str, *, invalid: bool) -> Any:
    code = pb_utils.TritonError.INVALID_ARG if invalid else pb_utils.TritonError.INTERNAL
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message, code))
