"""Server reflection answers as grpc.reflection.v1 and as v1alpha, from one implementation."""

from __future__ import annotations

import grpc
from google.protobuf import descriptor_pb2
from grpc_reflection.v1alpha import reflection_pb2

from recsvc.server.reflection import V1_FILE, V1_SERVICE, V1ALPHA_SERVICE, enable_reflection
from recsvc.server.servicer import SERVICE_NAME, RecommenderServicer, add_to_server


class _NoPipeline(RecommenderServicer):
    def __init__(self) -> None:
        pass


async def _ask(channel: grpc.aio.Channel, service: str, *requests: reflection_pb2.ServerReflectionRequest
               ) -> list[reflection_pb2.ServerReflectionResponse]:  # fmt: skip
    # Raw bytes on the method path, as any client of that service name sends them.
    call = channel.stream_stream(
        f"/{service}/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    return [reply async for reply in call(iter(requests), timeout=10)]


def _files(reply: reflection_pb2.ServerReflectionResponse) -> dict[str, descriptor_pb2.FileDescriptorProto]:
    protos = [descriptor_pb2.FileDescriptorProto.FromString(raw)
              for raw in reply.file_descriptor_response.file_descriptor_proto]  # fmt: skip
    return {p.name: p for p in protos}


async def test_both_names_list_the_same_services_and_describe_the_api() -> None:
    server = grpc.aio.server()
    add_to_server(server, _NoPipeline())
    enable_reflection(server, [SERVICE_NAME])
    enable_reflection(grpc.aio.server(), [])     # a second server in the process: v1's file is added once
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            listings = {}
            for service in (V1_SERVICE, V1ALPHA_SERVICE):
                listing, api = await _ask(
                    channel, service, reflection_pb2.ServerReflectionRequest(list_services=""),
                    reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE_NAME),
                )  # fmt: skip
                listings[service] = sorted(s.name for s in listing.list_services_response.service)
                proto = _files(api)["recsvc/v1/recommender.proto"]
                assert [m.name for m in proto.service[0].method] == ["Recommend", "RecordEvents", "Prefetch"]
            assert listings[V1_SERVICE] == listings[V1ALPHA_SERVICE] == sorted(
                [SERVICE_NAME, V1_SERVICE, V1ALPHA_SERVICE])

            # The v1 service describes itself as v1 (clients that resolve every listed service need it).
            [described] = await _ask(channel, V1_SERVICE,
                                     reflection_pb2.ServerReflectionRequest(file_containing_symbol=V1_SERVICE))
            v1 = _files(described)[V1_FILE]
            assert v1.package == "grpc.reflection.v1"
            [method] = v1.service[0].method
            assert (method.name, method.input_type, method.output_type) == (
                "ServerReflectionInfo", ".grpc.reflection.v1.ServerReflectionRequest",
                ".grpc.reflection.v1.ServerReflectionResponse")  # fmt: skip
            refs = {f.type_name for m in v1.message_type for f in m.field if f.type_name}
            assert refs and all(r.startswith(".grpc.reflection.v1.") for r in refs)
    finally:
        await server.stop(None)
