"""The Recommender servicer: proto in, validated domain values to the pipeline, proto out."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc

from recsvc.config import Settings
from recsvc.domain import Recommendation
from recsvc.errors import DeadlineExceeded, RecsvcError
from recsvc.pipeline import Pipeline
from recsvc.server.errors import abort_with
from recsvc.server.metrics import RpcMetrics
from recsvc.server.validation import events_from_proto, prefetch_users_from_proto, query_from_proto
from recsvc.v1 import recommender_pb2 as pb
from recsvc.v1 import recommender_pb2_grpc as pb_grpc

__all__ = ["RecommenderServicer", "response_to_proto"]

Context = grpc.aio.ServicerContext[Any, Any]


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

    def __init__(self, pipeline: Pipeline, settings: Settings, metrics: RpcMetrics | None = None) -> None:
        self._pipeline = pipeline
        self._settings = settings
        self.metrics = metrics or RpcMetrics()

    def _budget(self, context: Context) -> float:
        # The client's deadline when it sent one, never more than our own cap: nothing waits forever.
        remaining = context.time_remaining()
        cap = self._settings.request_timeout_s
        return cap if remaining is None else max(0.0, min(cap, remaining))

    async def Recommend(self, request: pb.RecommendRequest, context: Context) -> pb.RecommendResponse:
        """See the proto."""
        async with self.metrics.track("Recommend", lambda: _code(context)):
            return await self._recommend(request, context)

    async def _recommend(self, request: pb.RecommendRequest, context: Context) -> pb.RecommendResponse:
        try:
            query = query_from_proto(request, self._settings)
            budget = self._budget(context)
            try:
                async with asyncio.timeout(budget):
                    rec = await self._pipeline.recommend(query)
            except TimeoutError as exc:
                raise DeadlineExceeded(f"recommendation not ready within {budget:.3f} s") from exc
        except RecsvcError as exc:
            await abort_with(context, exc)
        return response_to_proto(rec)

    async def RecordEvents(
        self, request: pb.RecordEventsRequest, context: Context
    ) -> pb.RecordEventsResponse:
        """See the proto. No timeout here: cancelling a write mid-commit would leave the caller unsure."""
        async with self.metrics.track("RecordEvents", lambda: _code(context)):
            return await self._record(request, context)

    async def _record(self, request: pb.RecordEventsRequest, context: Context) -> pb.RecordEventsResponse:
        try:
            events = events_from_proto(request, self._settings)
            new = await self._pipeline.record(events)
        except RecsvcError as exc:
            await abort_with(context, exc)
        return pb.RecordEventsResponse(accepted=len(events), duplicates=len(events) - new)

    async def Prefetch(self, request: pb.PrefetchRequest, context: Context) -> pb.PrefetchResponse:
        """See the proto: queue warm-ups and return at once."""
        async with self.metrics.track("Prefetch", lambda: _code(context)):
            try:
                users = prefetch_users_from_proto(request, self._settings)
            except RecsvcError as exc:
                await abort_with(context, exc)
            return self._prefetch(users)

    def _prefetch(self, users: list[str]) -> pb.PrefetchResponse:
        prefetcher = self._pipeline.prefetcher
        queued, dropped = prefetcher.offer(users) if prefetcher is not None else (0, len(users))
        return pb.PrefetchResponse(queued=queued, dropped=dropped)


def _code(context: Context) -> str:
    # After abort() the context holds the status sent; a handler that returned normally sent OK.
    code = context.code()
    return code.name if isinstance(code, grpc.StatusCode) else "OK" if code in (None, 0) else str(code)
