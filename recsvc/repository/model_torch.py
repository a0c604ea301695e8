"""Triton python-backend model that serves a TorchScript ranker (``ranker.pt``) with torch, on CUDA in FP16.

The ``gpu-torch`` target (templates/ranker_gpu_torch.pbtxt) names this file with ``default_model_filename``,
so a version directory can hold it next to ``model.py`` (the ONNX Runtime model of the ``cpu`` target).
Like ranker_model.py it runs inside Triton's python stub, not in recsvc: it imports only numpy, torch and
Triton's ``triton_python_backend_utils``.

Layout it expects (``args["model_repository"]`` is the model directory)::

    <model>/<version>/model_torch.py
    <model>/<version>/ranker.pt              TorchScript, HISTORY, CANDIDATES int64 -> SCORES float32
                                             (or <version>/bundle/ranker.pt, the bundle's copy)
    <model>/<version>/bundle/manifest.json   num_items, history_len, num_candidates (optional)

Device: the instance's GPU when the instance group is ``KIND_GPU``, else the CPU (how the unit tests run it).
Precision (``TORCH_PRECISION`` parameter): ``fp16`` runs the FP32 TorchScript under ``torch.autocast`` with
float16, so matmuls, linears and einsums run in FP16 on tensor cores while softmax and reductions stay in
FP32. A plain ``.half()`` of the module is not an option: tracing records the padding mask's dtype
(``.to(weight.dtype)``) as the constant float32, and half weights then meet float32 activations.

Requests whose shapes agree are concatenated into one forward call; a bad request gets an error response
of its own instead of failing the others, as in ranker_model.py.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

__all__ = ["RANKER_FILE", "TritonPythonModel"]

RANKER_FILE = "ranker.pt"
_INPUTS = ("HISTORY", "CANDIDATES")
_OUTPUT = "SCORES"
_PRECISIONS = ("fp16", "fp32")
# (request index, HISTORY, CANDIDATES) of one valid request
_Member = tuple[int, npt.NDArray[np.int64], npt.NDArray[np.int64]]


def _pb_utils() -> Any:
    # Imported when used: only Triton's python stub provides it, and recsvc's own checks import this file.
    import triton_python_backend_utils

    return triton_python_backend_utils


def _parameter(config: dict[str, Any], key: str, default: str) -> str:
    value = config.get("parameters", {}).get(key, {}).get("string_value", "")
    return str(value) if value != "" else default


def _device(args: dict[str, str]) -> torch.device:
    if args.get("model_instance_kind", "CPU") != "GPU":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        # Fail the load with the reason, rather than a CUDA error on the first request.
        raise RuntimeError(f"instance kind GPU but torch {torch.__version__} sees no CUDA device")
    return torch.device(f"cuda:{int(args.get('model_instance_device_id', '0'))}")


class TritonPythonModel:
    """One TorchScript module per model instance, on the instance's device."""

    def initialize(self, args: dict[str, str]) -> None:
        """Load ranker.pt onto the instance's device and run it once per warm-up shape."""
        config = json.loads(args["model_config"])
        version_dir = Path(args["model_repository"]) / args["model_version"]
        self.name = f"{args.get('model_name', 'ranker')} v{args['model_version']}"
        self.device = _device(args)
        precision = _parameter(config, "TORCH_PRECISION", "fp16")
        if precision not in _PRECISIONS:
            raise ValueError(f"{self.name}: TORCH_PRECISION must be one of {_PRECISIONS}, got {precision!r}")
        self.fp16 = precision == "fp16"
        # The GPU does the work; CPU threads would only spin against the other stubs on the host.
        torch.set_num_threads(int(_parameter(config, "TORCH_THREADS", "1")))

        candidates = [version_dir / RANKER_FILE, version_dir / "bundle" / RANKER_FILE]
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            raise FileNotFoundError(f"{self.name}: no TorchScript ranker at {' or '.join(map(str, candidates))}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torch 2.13 deprecates torch.jit; it still works
            self.model: Any = torch.jit.load(str(path), map_location=self.device).eval()  # type: ignore[no-untyped-call]

        self.num_items: int | None = None
        self.history_len: int | None = None
        manifest_path = version_dir / "bundle" / "manifest.json"
        if manifest_path.is_file():
            manifest = json.loads(manifest_path.read_text())
            self.num_items = int(manifest["num_items"])
            # The module's position weights fix L; C is free.
            self.history_len = int(manifest["history_len"])
            history = np.full((1, int(manifest["history_len"])), -1, dtype=np.int64)
            cands = np.zeros((1, int(manifest["num_candidates"])), dtype=np.int64)
            # TorchScript's profiling executor optimises the graph after its first runs, and CUDA loads
            # kernels lazily: pay for both now, not in the first users' requests.
            for _ in range(3):
                self.scores(history, cands)

    def scores(self, history: npt.NDArray[np.int64], candidates: npt.NDArray[np.int64]) -> npt.NDArray[np.float32]:
        """Run the module on one batch; float32 [B, C] on the host."""
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=torch.float16, enabled=self.fp16):
            h = torch.from_numpy(history).to(self.device, non_blocking=True)
            c = torch.from_numpy(candidates).to(self.device, non_blocking=True)
            out = self.model(h, c)
        return np.ascontiguousarray(out.float().cpu().numpy(), dtype=np.float32)

    def _read(self, request: Any) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        """Return the request's two inputs, checked; raise ValueError with a message for the caller."""
        arrays = []
        pb_utils = _pb_utils()
        for name in _INPUTS:
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is None:
                raise ValueError(f"input {name} is missing")
            array = tensor.as_numpy()
            if array.dtype != np.int64 or array.ndim != 2:
                raise ValueError(f"input {name} must be int64 [B, N], got {array.dtype} {list(array.shape)}")
            if name == "HISTORY" and self.history_len is not None and array.shape[1] != self.history_len:
                raise ValueError(f"input HISTORY must have {self.history_len} columns, got {array.shape[1]}")
            if array.size and (array.min() < -1 or (self.num_items is not None and array.max() >= self.num_items)):
                # An id past the table would index out of bounds on the GPU: a device-side assert that
                # poisons the CUDA context for every later request, not just an error for this one.
                raise ValueError(
                    f"input {name} has item ids outside [-1, {self.num_items}): min {array.min()}, max {array.max()}"
                )
            arrays.append(array)
        history, candidates = arrays
        if history.shape[0] != candidates.shape[0]:
            raise ValueError(f"HISTORY has {history.shape[0]} rows but CANDIDATES has {candidates.shape[0]}")
        return history, candidates

    def execute(self, requests: list[Any]) -> list[Any]:
        """Answer every request, in order; one forward call per group of requests with equal shapes."""
        pb_utils = _pb_utils()
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
                scores = self.scores(history, candidates)
                if scores.shape != (history.shape[0], candidates.shape[1]):
                    raise ValueError(f"model returned SCORES {list(scores.shape)}")
            except Exception as exc:  # noqa: BLE001 - TorchScript raises plain RuntimeErrors with the cause inside
                for index, _, _ in members:
                    responses[index] = _error(f"{self.name}: inference failed: {exc}", invalid=False)
                continue
            start = 0
            for index, h, _ in members:
                rows = h.shape[0]
                responses[index] = pb_utils.InferenceResponse(
                    output_tensors=[pb_utils.Tensor(_OUTPUT, scores[start : start + rows])]
                )
                start += rows
        return responses

    def finalize(self) -> None:
        """Drop the module (and with it the device memory it holds) before the stub exits."""
        self.model = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def _error(message: str, *, invalid: bool) -> Any:
    pb_utils = _pb_utils()
    code = pb_utils.TritonError.INVALID_ARG if invalid else pb_utils.TritonError.INTERNAL
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message, code))
