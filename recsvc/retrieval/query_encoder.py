"""The query tower at serving time: the bundle's query_encoder.onnx run with ONNX Runtime in-process.

It is a few small matrix products, so a network hop to Triton would cost more than the compute; it runs
in a worker thread so the event loop never blocks on it.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

__all__ = ["QueryEncoder"]


class QueryEncoder:
    """HISTORY int64 [B, L] -> QUERY float32 [B, dim]."""

    def __init__(self, path: Path, *, threads: int = 1) -> None:
        options = ort.SessionOptions()
        # Per-request batches are tiny: more intra-op threads only add synchronisation.
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self._session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def encode_sync(self, history: npt.NDArray[np.int64]) -> npt.NDArray[np.float32]:
        """Encode on the calling thread."""
        out = self._session.run(["QUERY"], {"HISTORY": np.ascontiguousarray(history, dtype=np.int64)})[0]
        return np.asarray(out, dtype=np.float32)

    async def encode(self, history: npt.NDArray[np.int64]) -> npt.NDArray[np.float32]:
        """Encode in a worker thread (ONNX Runtime sessions are safe to run concurrently)."""
        return await asyncio.to_thread(self.encode_sync, history)
