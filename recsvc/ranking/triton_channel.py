"""One gRPC channel to Triton, shared by the inference client (TritonRanker) and model control (TritonModels).

With tritonclient's asyncio client, every failure (its own exceptions, and grpc.aio's) is translated into
``RankerUnavailable`` here, so callers handle one error type and can degrade to retrieval order.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tritonclient.grpc import MAX_GRPC_MESSAGE_SIZE
from tritonclient.grpc.aio import InferenceServerClient
from tritonclient.utils import InferenceServerException

from recsvc.config import Settings
from recsvc.errors import ConfigError, RankerUnavailable

__all__ = ["TritonChannel", "TritonTls", "is_client_error"]


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


def is_client_error(exc: Exception) -> bool:
    """Whether ``exc`` comes from tritonclient or gRPC (as opposed to a bug in our own code).

    tritonclient wraps the gRPC errors of every call it makes, but grpc.aio can still raise its own
    (a channel torn down mid-call, a usage error); matching on the module keeps grpc, which has no type
    information, out of our imports.
    """
    return isinstance(exc, InferenceServerException) or type(exc).__module__.split(".")[0] == "grpc"



class TritonChannel:
    """tritonclient's asyncio client for ``url``, opened on first use in the running event loop.

    One per process is enough: the inference client and model control share it (and its reconnect
    backoff). ``close`` makes every later use raise ``RankerUnavailable``.
    """

    def __init__(self, url: str, *, tls: TritonTls | None = None) -> None:
        self.url = url
        self.tls = tls
        self._client: InferenceServerClient | None = None
        self._closed = False

    @classmethod
    def from_settings(cls, settings: Settings) -> TritonChannel:
        """``triton_url``; ``triton_tls`` with ``triton_ca``, ``triton_cert`` and ``triton_key`` make it TLS."""
        tls = (TritonTls(ca=settings.triton_ca, cert=settings.triton_cert, key=settings.triton_key)
               if settings.triton_tls else None)  # fmt: skip
        return cls(settings.triton_url, tls=tls)

    def client(self) -> InferenceServerClient:
        """The client, opened now if it is not yet."""
        if self._closed:
            raise RankerUnavailable(f"triton channel to {self.url} is closed")
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

    def error(self, what: str, exc: Exception) -> RankerUnavailable:
        """``exc`` (from the client) as the one error callers handle, saying what failed."""
        if isinstance(exc, InferenceServerException):
            status = exc.status() or "error"
            detail = f"{status}: {exc.message()}"
        else:
            detail = f"{type(exc).__name__}: {exc}"
        return RankerUnavailable(f"triton {self.url} {what}: {detail}")

    async def close(self) -> None:
        """Close the channel; later uses raise ``RankerUnavailable``."""
        self._closed = True
        client, self._client = self._client, None
        if client is not None:
            await client.close()
