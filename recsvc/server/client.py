"""A small asyncio client for recsvc (the CLI's `recommend` and `record`, the demo, benchmarks).

``RETRY_SERVICE_CONFIG`` is the client retry policy the README documents ("Client retry policy"): with it
a client rides through rolling deploys (UNAVAILABLE while a server drains and its connections move) and
overload (RESOURCE_EXHAUSTED, retried no sooner than the server's ``grpc-retry-pushback-ms``).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health_pb2, health_pb2_grpc

from recsvc.domain import Event, Recommendation, ScoredItem
from recsvc.errors import InvalidArgument, RecsvcError, Unavailable
from recsvc.server.security import channel_credentials, token_metadata
from recsvc.v1 import recommender_pb2 as pb
from recsvc.v1 import recommender_pb2_grpc as pb_grpc

__all__ = ["RETRY_SERVICE_CONFIG", "RecsvcClient", "channel_options"]

# Every Recommender method is safe to retry: Recommend and Prefetch only read, and a retried RecordEvents
# is recognised as a duplicate. Up to 5 attempts, 50 ms doubling to 1 s apart, jittered by gRPC itself;
# a server's pushback replaces the backoff. Throttling stops retries from a channel whose calls mostly
# fail (a retry storm would only deepen an overload): each failure costs a token, each success returns
# 0.1, and below half of 20 tokens no call is retried until successes refill it.
RETRY_SERVICE_CONFIG = json.dumps({
    "methodConfig": [{
        "name": [{"service": "recsvc.v1.Recommender"}],
        "retryPolicy": {
            "maxAttempts": 5,
            "initialBackoff": "0.05s",
            "maxBackoff": "1s",
            "backoffMultiplier": 2,
            "retryableStatusCodes": ["UNAVAILABLE", "RESOURCE_EXHAUSTED"],
        },
    }],
    "retryThrottling": {"maxTokens": 20, "tokenRatio": 0.1},
})  # fmt: skip


def channel_options() -> list[tuple[str, Any]]:
    """Channel options that turn the retry policy on (for grpc.aio.insecure_channel/secure_channel)."""
    return [("grpc.enable_retries", 1), ("grpc.service_config", RETRY_SERVICE_CONFIG)]


class RecsvcClient:
    """Talks to a recsvc server; gRPC errors come back as recsvc errors.

    ``tls``: speak TLS, trusting ``ca`` (default: the system's roots) and presenting ``cert``/``key`` when
    given (mutual TLS). ``token`` is sent as a bearer token on every call (see README, "Security").
    """

    def __init__(
        self, target: str, *, timeout_s: float = 5.0, tls: bool = False, ca: Path | None = None,
        cert: Path | None = None, key: Path | None = None, token: str | None = None,
    ) -> None:  # fmt: skip
        if tls or ca is not None or cert is not None:
            self._channel = grpc.aio.secure_channel(target, channel_credentials(ca=ca, cert=cert, key=key),
                                                    options=channel_options())  # fmt: skip
        else:
            self._channel = grpc.aio.insecure_channel(target, options=channel_options())
        self._metadata = token_metadata(token)
        self._stub = pb_grpc.RecommenderStub(self._channel)  # type: ignore[no-untyped-call]
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._timeout = timeout_s

    async def __aenter__(self) -> RecsvcClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the channel."""
        await self._channel.close()

    async def recommend(
        self, user_id: str, k: int, *, context: Sequence[str] = (), exclude: Sequence[str] = ()
    ) -> Recommendation:
        """Call Recommend."""
        request = pb.RecommendRequest(user_id=user_id, k=k, context_item_ids=context, exclude_item_ids=exclude)
        try:
            r = await self._stub.Recommend(request, timeout=self._timeout, metadata=self._metadata)
        except grpc.aio.AioRpcError as exc:
            raise _translate(exc) from exc
        return Recommendation(
            items=[ScoredItem(i.item_id, i.score) for i in r.items], model_version=r.model_version,
            index_version=r.index_version, degraded=r.degraded, degraded_reason=r.degraded_reason,
        )  # fmt: skip

    async def record(self, events: Sequence[Event]) -> int:
        """Call RecordEvents (see ``record_counts``); the number of events accepted."""
        accepted, _ = await self.record_counts(events)
        return accepted

    async def record_counts(self, events: Sequence[Event]) -> tuple[int, int]:
        """Call RecordEvents; (accepted, duplicates). An event without an ``event_id`` is given a random one.

        The request is built once, so gRPC's retries (``RETRY_SERVICE_CONFIG``) send the same ids and the
        server stores each event once however often the call is retried; ``duplicates`` counts the events
        it already held (stored by an earlier attempt), which are among the accepted.
        """
        request = pb.RecordEventsRequest(events=[_event(e) for e in events])
        try:
            reply = await self._stub.RecordEvents(request, timeout=self._timeout, metadata=self._metadata)
        except grpc.aio.AioRpcError as exc:
            raise _translate(exc) from exc
        return int(reply.accepted), int(reply.duplicates)

    async def serving(self, service: str = "") -> bool:
        """True when the health service reports SERVING."""
        try:
            reply = await self._health.Check(health_pb2.HealthCheckRequest(service=service), timeout=self._timeout)
        except grpc.aio.AioRpcError:
            return False
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def _event(e: Event) -> pb.Event:
    ts = Timestamp()
    ts.FromNanoseconds(int(e.timestamp * 1e9))
    return pb.Event(user_id=e.user_id, item_id=e.item_id, type=int(e.type), timestamp=ts,  # type: ignore[arg-type]
                    event_id=e.event_id or uuid.uuid4().hex)


def _translate(exc: grpc.aio.AioRpcError) -> RecsvcError:
    details = exc.details() or ""
    if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
        field, _, message = details.partition(": ")
        return InvalidArgument(field, message)
    return Unavailable(f"{exc.code().name}: {details}")
