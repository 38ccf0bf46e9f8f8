"""The floor under any Python picker, for bench-envoy: a grpc.aio ExternalProcessor that does
nothing but answer the request headers and then the buffered body with a fixed destination in
`envoy.lb` metadata, the fewest messages a picker can exchange (2 in, 2 out, no decision).

    python bench/envoy/floor_picker.py PORT HOST:PORT
"""

from __future__ import annotations

import sys
from typing import Any

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

from decider.runtime import event_loop


class FloorPicker(pb_grpc.ExternalProcessorServicer):
    def __init__(self, destination: str) -> None:
        self._headers = pb.ProcessingResponse(request_headers=pb.HeadersResponse())
        self._body = pb.ProcessingResponse(
            request_body=pb.BodyResponse(response=pb.CommonResponse(clear_route_cache=True))
        )
        lb = self._body.dynamic_metadata.fields["envoy.lb"].struct_value
        lb.fields["x-gateway-destination-endpoint"].string_value = destination

    async def Process(self, request_iterator: Any, context: Any) -> None:
        while (message := await context.read()) is not grpc.aio.EOF:
            kind = message.WhichOneof("request")
            if kind == "request_headers":
                await context.write(self._headers)
            elif kind == "request_body":
                await context.write(self._body)
                return


async def serve(port: int, destination: str) -> None:
    server = grpc.aio.server()
    pb_grpc.add_ExternalProcessorServicer_to_server(FloorPicker(destination), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print("floor picker ready", flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    event_loop.run(serve(int(sys.argv[1]), sys.argv[2]), event_loop="uvloop")
