"""The ranker served by Triton Inference Server, reached over gRPC with tritonclient's asyncio client.

This is the only module that imports tritonclient: every tritonclient or gRPC exception is translated
into ``RankerUnavailable`` here, so callers handle one error type and can degrade to retrieval order.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from google.protobuf import json_format, text_format
from tritonclient.grpc import MAX_GRPC_MESSAGE_SIZE, InferInput, InferRequestedOutput, model_config_pb2
from tritonclient.grpc.aio import InferenceServerClient
from tritonclient.utils import InferenceServerException

from recsvc.config import Settings
from recsvc.errors import ConfigError, RankerUnavailable
from recsvc.ranking.base import check_batch, empty_scores
from recsvc.telemetry import RANK_BATCH_ROWS, TRITON_ERRORS, TRITON_SECONDS

__all__ = ["TritonRanker", "TritonTls"]


@dataclass(frozen=True, kw_only=True)
class TritonTls:
    """TLS to Triton's gRPC port: ``ca`` (default: the system's roots), ``cert``/``key`` for mutual TLS.

    tritonclient reads the files when the channel opens (first use); a rotated client certificate is
    picked up by the next process, not by an open channel.
    """

    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise ConfigError("Triton TLS: a client certificate needs its key, and a key its certificate")
        for setting, path in (("triton_ca", self.ca), ("triton_cert", self.cert), ("triton_key", self.key)):
            if path is None:
                continue
            try:
                head = path.read_bytes()[:65536]
            except OSError as exc:
                raise ConfigError(f"{setting} {path}: {exc.strerror or exc}") from exc
            if b"-----BEGIN " not in head:
                raise ConfigError(f"{setting} {path} is not a PEM file")

    def client_args(self) -> dict[str, Any]:
        """Keyword arguments of tritonclient's InferenceServerClient."""
        return {"ssl": True, "root_certificates": None if self.ca is None else str(self.ca),
                "private_key": None if self.key is None else str(self.key),
                "certificate_chain": None if self.cert is None else str(self.cert)}  # fmt: skip


def _is_client_error(exc: Exception) -> bool:
    """Whether ``exc`` comes from tritonclient or gRPC (as opposed to a bug in our own code).

    tritonclient wraps the gRPC errors of every call it makes, but grpc.aio can still raise its own
    (a channel torn down mid-call, a usage error); matching on the module keeps grpc, which has no type
    information, out of our imports.
    """
    return isinstance(exc, InferenceServerException) or type(exc).__module__.split(".")[0] == "grpc"


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

    ``timeout_s`` bounds each inference call (as a gRPC deadline). Batches larger than ``max_batch_size``
    (the model config's) are split and sent concurrently. The gRPC channel is opened on first use, in the
    running event loop.
    """

    def __init__(
        self,
        url: str,
        *,
        model_name: str = "ranker",
        timeout_s: float = 1.0,
        max_batch_size: int = 64,
        load_timeout_s: float = 120.0,
        tls: TritonTls | None = None,
    ) -> None:
        if timeout_s <= 0 or max_batch_size <= 0 or load_timeout_s <= 0:
            raise ValueError("timeout_s, max_batch_size and load_timeout_s must be > 0")
        self.url = url
        self.model_name = model_name
        self.timeout_s = timeout_s
        self.max_batch_size = max_batch_size
        self.load_timeout_s = load_timeout_s
        self.tls = tls
        self._client: InferenceServerClient | None = None
        self._closed = False

    @classmethod
    def from_settings(cls, settings: Settings, *, timeout_s: float | None = None) -> TritonRanker:
        """Build the ranker the service uses from the ``triton_*`` settings (``timeout_s`` overrides one).

        ``triton_tls`` with ``triton_ca``, ``triton_cert`` and ``triton_key`` makes the channel TLS.
        """
        tls = (TritonTls(ca=settings.triton_ca, cert=settings.triton_cert, key=settings.triton_key)
               if settings.triton_tls else None)  # fmt: skip
        return cls(settings.triton_url, model_name=settings.triton_model,
                   timeout_s=settings.triton_timeout_s if timeout_s is None else timeout_s, tls=tls)  # fmt: skip

    def _get_client(self) -> InferenceServerClient:
        if self._closed:
            raise RankerUnavailable(f"triton ranker for {self.url} is closed")
        if self._client is None:
            # tritonclient's defaults plus a short reconnect backoff: after a Triton restart the channel
            # is back within ~2 s instead of gRPC's default backoff of up to two minutes.
            options = [("grpc.max_send_message_length", MAX_GRPC_MESSAGE_SIZE),
                       ("grpc.max_receive_message_length", MAX_GRPC_MESSAGE_SIZE),
                       ("grpc.initial_reconnect_backoff_ms", 200), ("grpc.min_reconnect_backoff_ms", 200),
                       ("grpc.max_reconnect_backoff_ms", 2000)]  # fmt: skip
            tls = self.tls.client_args() if self.tls is not None else {}
            self._client = InferenceServerClient(self.url, channel_args=options, **tls)
        return self._client

    def _error(self, what: str, exc: Exception) -> RankerUnavailable:
        if isinstance(exc, InferenceServerException):
            status = exc.status() or "error"
            detail = f"{status}: {exc.message()}"
        else:
            detail = f"{type(exc).__name__}: {exc}"
        return RankerUnavailable(f"triton {self.url} {what}: {detail}")

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
        client = self._get_client()
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
            if not _is_client_error(exc):
                raise
            raise self._error(what, exc) from exc
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

    async def is_server_ready(self) -> bool:
        """Whether Triton answers and reports ready (False when it cannot be reached)."""
        try:
            return bool(await self._get_client().is_server_ready(client_timeout=self.timeout_s))
        except Exception as exc:
            if not _is_client_error(exc):
                raise
            return False

    async def is_model_ready(self, version: str = "") -> bool:
        """Whether ``version`` of the model is loaded and ready ("" asks about the default version).

        A version Triton does not know is simply not ready; an unreachable Triton raises
        ``RankerUnavailable`` so callers can tell "not loaded" from "down".
        """
        try:
            ready = await self._get_client().is_model_ready(self.model_name, version, client_timeout=self.timeout_s)
        except Exception as exc:
            if not _is_client_error(exc):
                raise
            what = f"model {self.model_name} version {version or '(default)'} readiness"
            raise self._error(what, exc) from exc
        return bool(ready)

    async def load_model(self, name: str | None = None) -> None:
        """Load (or reload) a model in Triton's explicit model-control mode.

        Triton rescans the model's directory and loads the versions its version policy selects; the
        call returns when loading has finished, so it gets ``load_timeout_s`` rather than the
        inference timeout.
        """
        name = name or self.model_name
        try:
            await self._get_client().load_model(name, client_timeout=self.load_timeout_s)
        except Exception as exc:
            if not _is_client_error(exc):
                raise
            raise self._error(f"load of model {name}", exc) from exc

    async def loaded_versions(self) -> set[int]:
        """Versions of the model Triton holds READY now (from its repository index)."""
        try:
            index: Any = await self._get_client().get_model_repository_index(client_timeout=self.timeout_s)
        except Exception as exc:
            if not _is_client_error(exc):
                raise
            raise self._error("repository index", exc) from exc
        return {int(m.version) for m in index.models
                if m.name == self.model_name and m.state == "READY" and m.version.isdigit()}  # fmt: skip

    async def load_versions(self, versions: Sequence[int], config_pbtxt: str) -> None:
        """Make exactly ``versions`` of the model loaded (EXPLICIT mode), whatever the file's version policy.

        Triton's load API takes a whole model config as an override: the repository's config.pbtxt with
        ``version_policy { specific { versions: [...] } }``. Versions already loaded and still listed
        keep serving while the others load or unload (checked against Triton 2.51: zero failed requests
        on the listed versions during such a reload).
        """
        config = text_format.Parse(config_pbtxt, model_config_pb2.ModelConfig())
        config.version_policy.specific.versions[:] = sorted(set(versions))
        override = json_format.MessageToJson(config, preserving_proto_field_name=True)
        what = f"load of {self.model_name} versions {sorted(set(versions))}"
        try:
            await self._get_client().load_model(self.model_name, config=override, client_timeout=self.load_timeout_s)
        except Exception as exc:
            if not _is_client_error(exc):
                raise
            raise self._error(what, exc) from exc

    async def close(self) -> None:
        """Close the gRPC channel; later calls raise ``RankerUnavailable``."""
        self._closed = True
        client, self._client = self._client, None
        if client is not None:
            await client.close()
