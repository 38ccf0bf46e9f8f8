"""Server reflection, v1 and v1alpha, that also answers for method names.

grpcio-reflection answers `file_containing_symbol` from the protobuf descriptor pool, and the
upb pool's FindFileContainingSymbol does not resolve methods (grpc/grpc#34743): without this,
`grpcurl describe decider.v1.DeciderService.Decide` fails with "Symbol not found", and so do
tools that resolve the method before calling it (ghz without a protoset). The reflection
protocol counts methods as symbols, so a method name is answered with its service's file.

grpcio-reflection serves only `grpc.reflection.v1alpha.ServerReflection`; tools that speak v1
(`buf curl --reflect-protocol grpc-v1`, newer clients that no longer fall back) get
UNIMPLEMENTED from it. `grpc.reflection.v1` is the same protocol under another package name:
its messages have the same fields and numbers, so the same servicer answers both, and the v1
file descriptor (for `describe grpc.reflection.v1.ServerReflection`) is v1alpha's renamed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.descriptor import FileDescriptor
from grpc_reflection.v1alpha import reflection, reflection_pb2
from grpc_reflection.v1alpha._async import ReflectionServicer as AsyncReflectionServicer
from grpc_reflection.v1alpha.reflection import ReflectionServicer as SyncReflectionServicer

V1ALPHA_SERVICE_NAME = reflection.SERVICE_NAME
V1_PACKAGE = "grpc.reflection.v1"
V1_SERVICE_NAME = f"{V1_PACKAGE}.ServerReflection"
V1_FILE = "grpc/reflection/v1/reflection.proto"
SERVICE_NAMES = (V1_SERVICE_NAME, V1ALPHA_SERVICE_NAME)
# Kept for callers that list the reflection service by its original name.
SERVICE_NAME = V1ALPHA_SERVICE_NAME


class MethodAwarePool:
    """A descriptor pool whose FindFileContainingSymbol also finds `package.Service.Method`;
    every other lookup goes to the wrapped pool unchanged."""

    def __init__(self, pool: descriptor_pool.DescriptorPool | None = None) -> None:
        self._pool = pool if pool is not None else descriptor_pool.Default()

    def FindFileContainingSymbol(self, symbol: str) -> FileDescriptor:
        try:
            return self._pool.FindFileContainingSymbol(symbol)
        except KeyError:
            service_name, _, method = symbol.rpartition(".")
            try:
                service = self._pool.FindServiceByName(service_name) if service_name else None
            except KeyError:
                service = None
            if service is not None and method in service.methods_by_name:
                return service.file
            raise  # the reflection servicer answers NOT_FOUND

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pool, name)


def v1_file_descriptor(pool: descriptor_pool.DescriptorPool | None = None) -> FileDescriptor:
    """grpc/reflection/v1/reflection.proto in `pool` (default: the default pool), built once
    from the v1alpha file with the package renamed."""
    pool = pool if pool is not None else descriptor_pool.Default()
    try:
        return pool.FindFileByName(V1_FILE)
    except KeyError:
        pass
    proto = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(proto)
    old = f".{proto.package}."
    proto.name = V1_FILE
    proto.package = V1_PACKAGE
    proto.ClearField("options")
    for message in proto.message_type:
        for field in message.field:
            if field.type_name.startswith(old):
                field.type_name = f".{V1_PACKAGE}." + field.type_name.removeprefix(old)
    for service in proto.service:
        for method in service.method:
            method.input_type = f".{V1_PACKAGE}." + method.input_type.removeprefix(old)
            method.output_type = f".{V1_PACKAGE}." + method.output_type.removeprefix(old)
    pool.Add(proto)
    return pool.FindFileByName(V1_FILE)


def enable(service_names: Sequence[str], server: grpc.Server | grpc.aio.Server) -> None:
    """Serves reflection v1 and v1alpha on `server` (aio or sync) over MethodAwarePool; both
    versions are listed among the services whatever `service_names` says."""
    v1_file_descriptor()
    names = tuple(dict.fromkeys((*service_names, *SERVICE_NAMES)))
    servicer = (
        AsyncReflectionServicer(names, pool=MethodAwarePool())
        if isinstance(server, grpc.aio.Server)
        else SyncReflectionServicer(names, pool=MethodAwarePool())
    )
    # The wire format of both versions is the same, so v1alpha's classes read and write v1.
    handler = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        tuple(
            grpc.method_handlers_generic_handler(name, {"ServerReflectionInfo": handler})
            for name in SERVICE_NAMES
        )
    )
