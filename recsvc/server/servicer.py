"""The Recommender servicer: proto in, validated domain values to the pipeline, proto out.

``add_to_server`` registers it in place of the generated ``add_RecommenderServicer_to_server``: same
service and method names (reflection and clients see no difference), but each request is parsed by a
deserializer that cannot fail. Bytes that are not the method's request message become an
``Unparseable`` marker and the call ends INVALID_ARGUMENT, instead of the generated deserializer's
DecodeError turning into UNKNOWN with a traceback in the log for every such request.

Request ids, RPC metrics and the status of unexpected exceptions are the interceptor's business
(server/interceptors.py), for these handlers and the unparseable path alike.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError, Message

from recsvc.config import Settings
from recsvc.domain import Recommendation
from recsvc.errors import DeadlineExceeded, RecsvcError
from recsvc.logs import Throttle
from recsvc.pipeline import Pipeline
from recsvc.server.errors import abort_with
from recsvc.server.names import SERVICE_NAME
from recsvc.server.validation import events_from_proto, prefetch_users_from_proto, query_from_proto
from recsvc.v1 import recommender_pb2 as pb
from recsvc.v1 import recommender_pb2_grpc as pb_grpc

__all__ = [
    "SERVICE_NAME",
    "UNPARSEABLE_LOG_INTERVAL_S",
    "RecommenderServicer",
    "Unparseable",
    "add_to_server",
    "response_to_proto",
]

log = logging.getLogger(__name__)

Context = grpc.aio.ServicerContext[Any, Any]


# Garbage can arrive at any rate: one log line per interval (with a count) is enough to notice it.
UNPARSEABLE_LOG_INTERVAL_S = 10.0


def response_to_proto(rec: Recommendation) -> pb.RecommendResponse:
    """Domain Recommendation -> RecommendResponse."""
    return pb.RecommendResponse(
        items=[pb.RecommendedItem(item_id=i.item_id, score=i.score) for i in rec.items],
        model_version=rec.model_version,
        index_version=rec.index_version,
        degraded=rec.degraded,
        degraded_reason=rec.degraded_reason,
    )


class RecommenderServicer(pb_grpc.RecommenderServicer):
    """recsvc.v1.Recommender over a Pipeline."""

    def __init__(self, pipeline: Pipeline, settings: Settings) -> None:
        self._pipeline = pipeline
        self._settings = settings

    def _budget(self, context: Context) -> float:
        # The client's deadline when it sent one, never more than our own cap: nothing waits forever.
        remaining = context.time_remaining()
        cap = self._settings.request_timeout_s
        return cap if remaining is None else max(0.0, min(cap, remaining))

    async def Recommend(self, request: pb.RecommendRequest, context: Context) -> pb.RecommendResponse:
        """See the proto."""
        try:
            query = query_from_proto(request, self._settings)
            budget = self._budget(context)
            try:
                async with asyncio.timeout(budget):
                    # The pipeline shares this deadline out among its stages (their fallbacks answer in time).
                    rec = await self._pipeline.recommend(query, deadline=time.monotonic() + budget)
            except TimeoutError as exc:
                raise DeadlineExceeded(f"recommendation not ready within {budget:.3f} s") from exc
        except RecsvcError as exc:
            await abort_with(context, exc)
        return response_to_proto(rec)

    async def RecordEvents(
        self, request: pb.RecordEventsRequest, context: Context
    ) -> pb.RecordEventsResponse:
        """See the proto. No timeout here: cancelling a write mid-commit would leave the caller unsure."""
        try:
            events = events_from_proto(request, self._settings)
            new = await self._pipeline.record(events)
        except RecsvcError as exc:
            await abort_with(context, exc)
        return pb.RecordEventsResponse(accepted=len(events), duplicates=len(events) - new)

    async def Prefetch(self, request: pb.PrefetchRequest, context: Context) -> pb.PrefetchResponse:
        """See the proto: queue warm-ups and return at once."""
        try:
            users = prefetch_users_from_proto(request, self._settings)
        except RecsvcError as exc:
            await abort_with(context, exc)
        prefetcher = self._pipeline.prefetcher
        queued, dropped = prefetcher.offer(users) if prefetcher is not None else (0, len(users))
        return pb.PrefetchResponse(queued=queued, dropped=dropped)


@dataclass(frozen=True, slots=True)
class Unparseable:
    """What the deserializer hands the handler for bytes that are not the request message."""

    size: int
    reason: str


def _lenient(parse: Callable[[bytes], Message]) -> Callable[[bytes], Message | Unparseable]:
    def deserialize(data: bytes) -> Message | Unparseable:
        try:
            return parse(data)
        except DecodeError as exc:
            return Unparseable(len(data), str(exc))

    return deserialize


def add_to_server(server: grpc.aio.Server, servicer: RecommenderServicer) -> None:
    """Register ``servicer`` as recsvc.v1.Recommender on ``server`` (before ``server.start()``)."""
    throttle = Throttle(UNPARSEABLE_LOG_INTERVAL_S)
    service = pb.DESCRIPTOR.services_by_name["Recommender"]
    methods: dict[str, Callable[[Any, Context], Awaitable[Message]]] = {
        "Recommend": servicer.Recommend, "RecordEvents": servicer.RecordEvents, "Prefetch": servicer.Prefetch,
    }  # fmt: skip
    handlers = {}
    for name, behavior in methods.items():
        method = service.methods_by_name[name]
        request_type = pb.DESCRIPTOR.message_types_by_name[method.input_type.name]
        response_type = pb.DESCRIPTOR.message_types_by_name[method.output_type.name]
        request_class = getattr(pb, request_type.name)
        response_class = getattr(pb, response_type.name)
        handlers[name] = grpc.unary_unary_rpc_method_handler(
            _guard(name, request_type.full_name, behavior, throttle),
            request_deserializer=_lenient(request_class.FromString),
            response_serializer=response_class.SerializeToString,
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    # As the generated code does: registered methods are matched inside grpc core, a little faster.
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


def _guard(
    name: str, type_name: str, behavior: Callable[[Any, Context], Awaitable[Message]], throttle: Throttle
) -> Callable[[Any, Context], Awaitable[Message]]:
    async def handle(request: Any, context: Context) -> Message:
        if isinstance(request, Unparseable):
            held_back = throttle.allow(name)
            if held_back is not None:
                more = f"; {held_back} more since the last such line" if held_back else ""
                log.warning("%s: a request of %d bytes could not be parsed as %s (%s)%s",
                            name, request.size, type_name, request.reason, more)  # fmt: skip
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"request: the message could not be parsed as {type_name}")  # fmt: skip
        return await behavior(request, context)

    return handle
