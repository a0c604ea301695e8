"""The ranker served in-process with ONNX Runtime: offline evaluation, and a stand-in for Triton in tests."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from recsvc.errors import BundleError, RankerUnavailable
from recsvc.ranking.base import check_batch, empty_scores

__all__ = ["OnnxRanker", "make_session"]


def make_session(path: Path, *, intra_op_threads: int = 1) -> Any:
    """Open an ONNX Runtime CPU session with a small, fixed thread budget.

    ORT's default pool has one spinning thread per core, which starves the gRPC server and the event
    loop on small machines; callers get parallelism from concurrent requests instead.
    """
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own pybind exception types, and plain ones for I/O
        raise BundleError(f"cannot load ONNX model {path}: {exc}") from exc


class OnnxRanker:
    """``Ranker`` backed by one ONNX Runtime session (``session.run`` is thread-safe).

    ``version`` names the model version this file is; a ``score`` call for another version raises
    ``RankerUnavailable``, as Triton would for a version it has not loaded. ``None`` accepts any.
    Constructing one reads the file: do it at start-up or in a thread, not on a busy event loop.
    """

    def __init__(self, path: Path, *, version: str | None = None, intra_op_threads: int = 1) -> None:
        self.path = path
        self.version = version
        self._session = make_session(path, intra_op_threads=intra_op_threads)
        self._closed = False

    async def score(
        self, history: npt.NDArray[np.int64], candidates: npt.NDArray[np.int64], *, version: str
    ) -> npt.NDArray[np.float32]:
        """Score on a worker thread; see ``Ranker.score``."""
        if self._closed:
            raise RankerUnavailable(f"ranker {self.path} is closed")
        if self.version is not None and version != self.version:
            raise RankerUnavailable(f"ranker {self.path} serves version {self.version}, not {version!r}")
        history, candidates = check_batch(history, candidates)
        if history.shape[0] == 0:
            return empty_scores(candidates)
        return await asyncio.to_thread(self._run, history, candidates)

    def _run(self, history: npt.NDArray[np.int64], candidates: npt.NDArray[np.int64]) -> npt.NDArray[np.float32]:
        try:
            (scores,) = self._session.run(["SCORES"], {"HISTORY": history, "CANDIDATES": candidates})
        except Exception as exc:  # ORT's pybind exception types are not importable by a stable name
            raise RankerUnavailable(f"ranker {self.path} failed: {exc}") from exc
        return np.asarray(scores, dtype=np.float32)

    async def close(self) -> None:
        """Drop the session (its memory is freed when in-flight runs finish)."""
        self._closed = True
