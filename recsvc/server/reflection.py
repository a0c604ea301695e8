"""Server reflection under both of its names: ``grpc.reflection.v1`` and ``grpc.reflection.v1alpha``.

grpcio-reflection serves only v1alpha (what grpcurl up to 1.8 asks for). grpcurl 1.9+, grpc-js
reflection clients, Postman and grpcui ask for ``grpc.reflection.v1.ServerReflection`` first. The two
services' messages are identical on the wire (same fields, numbers and types; v1 only renamed the
package), so one implementation, grpcio-reflection's own servicer, answers under both names.

For ``describe grpc.reflection.v1.ServerReflection`` to work too, v1's file descriptor is derived from
v1alpha's (package and type references renamed) and added to the default descriptor pool, where the
servicer looks files up. No copy of the upstream v1 proto is needed for that (protos/README.md says
where the originals are).
"""

from __future__ import annotations

from collections.abc import Iterable

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection, reflection_pb2

__all__ = ["V1ALPHA_SERVICE", "V1_FILE", "V1_SERVICE", "enable_reflection"]

V1ALPHA_SERVICE: str = reflection.SERVICE_NAME      # grpc.reflection.v1alpha.ServerReflection
V1_SERVICE = "grpc.reflection.v1.ServerReflection"
V1_FILE = "grpc/reflection/v1/reflection.proto"      # the upstream file name (grpc/grpc-proto)
_METHOD = "ServerReflectionInfo"


def _register_v1_descriptor(pool: descriptor_pool.DescriptorPool) -> None:
    """Add v1's reflection.proto to ``pool``, made from v1alpha's; nothing when it is there already."""
    try:
        pool.FindFileByName(V1_FILE)
        return                                  # registered by us before, or by a library that ships v1
    except KeyError:
        pass
    alpha = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(alpha)
    old, new = f".{alpha.package}.", ".grpc.reflection.v1."
    v1 = descriptor_pb2.FileDescriptorProto(name=V1_FILE, package="grpc.reflection.v1", syntax=alpha.syntax)
    v1.message_type.extend(alpha.message_type)
    v1.service.extend(alpha.service)
    for message in v1.message_type:
        for field in message.field:
            if field.type_name.startswith(old):
                field.type_name = new + field.type_name[len(old) :]
    for service in v1.service:
        for method in service.method:
            method.input_type = new + method.input_type[len(old) :]
            method.output_type = new + method.output_type[len(old) :]
    pool.AddSerializedFile(v1.SerializeToString())


def enable_reflection(server: grpc.aio.Server, service_names: Iterable[str]) -> None:
    """Serve reflection for ``service_names`` (and itself, under both names) on ``server``, before start."""
    _register_v1_descriptor(descriptor_pool.Default())
    names = (*service_names, V1_SERVICE, V1ALPHA_SERVICE)
    servicer = reflection.aio.ReflectionServicer(names)
    # v1alpha's message classes parse and write v1's bytes: the two protos differ only in package name.
    handler = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    for name in (V1_SERVICE, V1ALPHA_SERVICE):
        handlers = {_METHOD: handler}
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name, handlers),))
        server.add_registered_method_handlers(name, handlers)
