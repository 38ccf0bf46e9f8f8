"""Server reflection that also answers for method names.

grpcio-reflection answers `file_containing_symbol` from the protobuf descriptor pool, and the
upb pool's FindFileContainingSymbol does not resolve methods (grpc/grpc#34743): without this,
`grpcurl describe decider.v1.DeciderService.Decide` fails with "Symbol not found", and so do
tools that resolve the method before calling it (ghz without a protoset). The reflection
protocol counts methods as symbols, so a method name is answered with its service's file.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc
from google.protobuf import descriptor_pool
from google.protobuf.descriptor import FileDescriptor
from grpc_reflection.v1alpha import reflection

SERVICE_NAME = reflection.SERVICE_NAME


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


def enable(service_names: Sequence[str], server: grpc.Server | grpc.aio.Server) -> None:
    """grpc_reflection's enable_server_reflection (aio or sync server), over MethodAwarePool."""
    reflection.enable_server_reflection(tuple(service_names), server, pool=MethodAwarePool())
