"""RECSVC_EVENT_LOOP: the server's coroutine on the standard loop or on uvloop, and gRPC working on both."""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import grpc
import pytest

from recsvc.errors import ConfigError
from recsvc.server.event_loop import loop_factory, run
from recsvc.v1 import recommender_pb2 as pb
from recsvc.v1 import recommender_pb2_grpc as pb_grpc

uvloop = pytest.importorskip("uvloop")


class _Echo(pb_grpc.RecommenderServicer):
    async def Recommend(self, request: pb.RecommendRequest, context: Any) -> pb.RecommendResponse:
        return pb.RecommendResponse(items=[pb.RecommendedItem(item_id=request.user_id, score=1.0)])


async def _round_trip() -> tuple[str, str]:
    server = grpc.aio.server()
    pb_grpc.add_RecommenderServicer_to_server(_Echo(), server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.RecommenderStub(channel)  # type: ignore[no-untyped-call]
            replies = await asyncio.gather(*(stub.Recommend(pb.RecommendRequest(user_id=f"u{i}")) for i in range(20)))
        assert [r.items[0].item_id for r in replies] == [f"u{i}" for i in range(20)]
        return type(asyncio.get_running_loop()).__module__, replies[0].items[0].item_id
    finally:
        await server.stop(None)


@pytest.mark.parametrize(("choice", "module"), [("asyncio", "asyncio"), ("uvloop", "uvloop"), ("auto", "uvloop")])
def test_grpc_aio_serves_on_the_chosen_loop(choice: str, module: str) -> None:
    loop_module, first = run(_round_trip(), choice)
    assert loop_module.split(".")[0] == module and first == "u0"


def test_asking_for_uvloop_without_it_is_a_clear_error_and_auto_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)     # what Python does for a module that is not there
    with pytest.raises(ConfigError, match=r"RECSVC_EVENT_LOOP.*uvloop is not installed"):
        run(_round_trip(), "uvloop")
    assert loop_factory("auto") is None and loop_factory("asyncio") is None
