"""add_to_server: the same service, methods and descriptors as the generated registration (reflection and
generated stubs see no difference), with requests parsed by a deserializer that cannot fail."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

from recsvc.server.servicer import SERVICE_NAME, RecommenderServicer, add_to_server
from recsvc.v1 import recommender_pb2 as pb
from recsvc.v1 import recommender_pb2_grpc as pb_grpc


class EchoServicer(RecommenderServicer):
    """No pipeline: answers from the request, to see what the handler was given."""

    def __init__(self) -> None:
        self.seen: list[Any] = []

    async def Prefetch(self, request: Any, context: Any) -> pb.PrefetchResponse:
        self.seen.append(request)
        return pb.PrefetchResponse(queued=len(request.user_ids))


async def test_reflection_and_generated_stubs_see_the_service_unchanged() -> None:
    servicer = EchoServicer()
    server = grpc.aio.server()
    add_to_server(server, servicer)
    reflection.enable_server_reflection((SERVICE_NAME, reflection.SERVICE_NAME), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            reply = await pb_grpc.RecommenderStub(channel).Prefetch(  # type: ignore[no-untyped-call]
                pb.PrefetchRequest(user_ids=["a", "b"]), timeout=10)
            assert reply.queued == 2 and isinstance(servicer.seen[0], pb.PrefetchRequest)

            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            requests = [reflection_pb2.ServerReflectionRequest(list_services=""),
                        reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE_NAME)]  # fmt: skip
            listing, files = [r async for r in stub.ServerReflectionInfo(iter(requests))]
            assert SERVICE_NAME in {s.name for s in listing.list_services_response.service}
            [raw] = files.file_descriptor_response.file_descriptor_proto[:1]
            proto = descriptor_pb2.FileDescriptorProto.FromString(raw)
            assert proto.name == "recsvc/v1/recommender.proto"
            assert [m.name for m in proto.service[0].method] == ["Recommend", "RecordEvents", "Prefetch"]

            # Bytes that are not a PrefetchRequest never reach the servicer.
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await channel.unary_unary(f"/{SERVICE_NAME}/Prefetch")(b"\xff\xff", timeout=10)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert len(servicer.seen) == 1
    finally:
        await server.stop(None)

