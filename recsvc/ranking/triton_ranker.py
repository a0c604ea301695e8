"""The ranker served by Triton Inference Server: inference over the shared TritonChannel.

Model control (loading and pinning versions) is TritonModels' job (recsvc/ranking/triton_models.py).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import numpy as np
import numpy.typing as npt
from tritonclient.grpc import InferInput, InferRequestedOutput
from tritonclient.utils import InferenceServerException

from recsvc.config import Settings
from recsvc.errors import RankerUnavailable
from recsvc.ranking.base import check_batch, empty_scores
from recsvc.ranking.triton_channel import TritonChannel, TritonTls, is_client_error
from recsvc.telemetry import RANK_BATCH_ROWS, TRITON_ERRORS, TRITON_SECONDS

__all__ = ["TritonRanker"]


def _error_reason(exc: Exception) -> str:
    """The ``reason`` label of ``recsvc_triton_errors_total`` for a failed inference call."""
    status = str(exc.status() or "") if isinstance(exc, InferenceServerException) else ""
    text = f"{status} {exc}".upper()
    if "DEADLINE" in text or isinstance(exc, TimeoutError):
        return "timeout"
    if "UNAVAILABLE" in text or isinstance(exc, ConnectionError):
        return "unavailable"
    return "error"


class TritonRanker:
    """``Ranker`` that calls the Triton model ``model_name`` at a pinned version.

    ``channel`` is a shared TritonChannel, or a URL for a channel of its own (closed with the ranker).
    ``timeout_s`` bounds each inference call (as a gRPC deadline). Batches larger than ``max_batch_size``
    (the model config's) are split and sent concurrently.
    """

    def __init__(
        self,
        channel: TritonChannel | str,
        *,
        model_name: str = "ranker",
        timeout_s: float = 1.0,
        max_batch_size: int = 64,
        tls: TritonTls | None = None,
    ) -> None:
        if timeout_s <= 0 or max_batch_size <= 0:
            raise ValueError("timeout_s and max_batch_size must be > 0")
        self._owns_channel = isinstance(channel, str)
        self.channel = TritonChannel(channel, tls=tls) if isinstance(channel, str) else channel
        self.url = self.channel.url
        self.model_name = model_name
        self.timeout_s = timeout_s
        self.max_batch_size = max_batch_size

    @classmethod
    def from_settings(
        cls, settings: Settings, *, timeout_s: float | None = None, channel: TritonChannel | None = None
    ) -> TritonRanker:
        """The ranker the service uses, from the ``triton_*`` settings (``timeout_s`` overrides one)."""
        ranker = cls(channel or TritonChannel.from_settings(settings), model_name=settings.triton_model,
                     timeout_s=settings.triton_timeout_s if timeout_s is None else timeout_s)  # fmt: skip
        ranker._owns_channel = channel is None
        return ranker

    async def score(
        self, history: npt.NDArray[np.int64], candidates: npt.NDArray[np.int64], *, version: str
    ) -> npt.NDArray[np.float32]:
        """Score on Triton; see ``Ranker.score``. Any failure raises ``RankerUnavailable``."""
        history, candidates = check_batch(history, candidates)
        batch = history.shape[0]
        if batch == 0:
            return empty_scores(candidates)
        if batch <= self.max_batch_size:
            return await self._infer(history, candidates, version)
        step = self.max_batch_size
        parts = await asyncio.gather(
            *(self._infer(history[i : i + step], candidates[i : i + step], version) for i in range(0, batch, step))
        )
        return np.concatenate(parts, axis=0)

    async def _infer(
        self, history: npt.NDArray[np.int64], candidates: npt.NDArray[np.int64], version: str
    ) -> npt.NDArray[np.float32]:
        client = self.channel.client()
        what = f"model {self.model_name} version {version or '(default)'}"
        inputs = [
            InferInput("HISTORY", list(history.shape), "INT64"),
            InferInput("CANDIDATES", list(candidates.shape), "INT64"),
        ]
        inputs[0].set_data_from_numpy(history)
        inputs[1].set_data_from_numpy(candidates)
        RANK_BATCH_ROWS.observe(history.shape[0])
        start = time.perf_counter()
        try:
            result = await client.infer(
                self.model_name,
                inputs,
                model_version=version,
                outputs=[InferRequestedOutput("SCORES")],
                client_timeout=self.timeout_s,
            )
        except Exception as exc:
            TRITON_SECONDS.observe(time.perf_counter() - start)
            TRITON_ERRORS.labels(_error_reason(exc)).inc()
            if not is_client_error(exc):
                raise
            raise self.channel.error(what, exc) from exc
        except asyncio.CancelledError:
            TRITON_SECONDS.observe(time.perf_counter() - start)      # the rank stage's budget ran out first
            TRITON_ERRORS.labels("cancelled").inc()
            raise
        TRITON_SECONDS.observe(time.perf_counter() - start)
        scores: Any = result.as_numpy("SCORES")
        expected = (history.shape[0], candidates.shape[1])
        if scores is None or scores.shape != expected or scores.dtype != np.float32:
            TRITON_ERRORS.labels("bad_response").inc()
            got = "nothing" if scores is None else f"{scores.dtype} {scores.shape}"
            raise RankerUnavailable(f"triton {self.url} {what}: SCORES is {got}, expected float32 {expected}")
        return np.asarray(scores)

    async def close(self) -> None:
        """Close the channel when it is the ranker's own (a shared one is closed by its owner)."""
        if self._owns_channel:
            await self.channel.close()
