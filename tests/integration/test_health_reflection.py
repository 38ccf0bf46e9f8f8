"""Standard health checking and server reflection, so grpcurl and buf curl need no protos."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import grpc
import pytest
from decider_support import endpoints_doc, grpcurl_binary
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("service", ["", "decider.v1.DeciderService"])
async def test_health_check_is_serving(start_server, service):
    async with start_server() as srv:
        stub = health_pb2_grpc.HealthStub(srv.channel)
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_reflection_lists_every_service(start_server):
    async with start_server() as srv:
        stub = reflection_pb2_grpc.ServerReflectionStub(srv.channel)
        call = stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
        )
        replies = [reply async for reply in call]
        names = {s.name for s in replies[0].list_services_response.service}
        assert {
            "decider.v1.DeciderService",
            "decider.v1.RegistryService",
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection",
        } <= names


async def _file_containing(srv, symbol: str) -> reflection_pb2.ServerReflectionResponse:
    stub = reflection_pb2_grpc.ServerReflectionStub(srv.channel)
    call = stub.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(file_containing_symbol=symbol)]), timeout=5
    )
    replies = [reply async for reply in call]
    assert len(replies) == 1
    return replies[0]


@pytest.mark.parametrize(
    ("symbol", "file"),
    [
        ("decider.v1.DeciderService", "decider/v1/decider_service.proto"),
        ("decider.v1.DeciderService.Decide", "decider/v1/decider_service.proto"),
        ("decider.v1.RegistryService.ListEndpoints", "decider/v1/registry_service.proto"),
        ("grpc.health.v1.Health.Check", "grpc_health/v1/health.proto"),
        ("decider.v1.DecideRequest", "decider/v1/decider_service.proto"),
    ],
)
async def test_reflection_finds_the_file_of_services_methods_and_messages(
    start_server, symbol, file
):
    async with start_server() as srv:
        reply = await _file_containing(srv, symbol)
        assert reply.WhichOneof("message_response") == "file_descriptor_response", reply
        names = [
            descriptor_pb2.FileDescriptorProto.FromString(raw).name
            for raw in reply.file_descriptor_response.file_descriptor_proto
        ]
        assert names[0] == file


@pytest.mark.parametrize(
    "symbol", ["decider.v1.DeciderService.NoSuchMethod", "no.such.Service.Method", "Decide"]
)
async def test_reflection_answers_not_found_for_unknown_symbols(start_server, symbol):
    async with start_server() as srv:
        reply = await _file_containing(srv, symbol)
        assert reply.WhichOneof("message_response") == "error_response"
        assert reply.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]


async def _run(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    return proc.returncode or 0, out.decode(), err.decode()


async def test_grpcurl_lists_describes_and_decides_through_reflection(start_server):
    grpcurl = grpcurl_binary()
    doc = endpoints_doc("llama", 2, routing={"default_strategy": "round_robin"})
    async with start_server(doc) as srv:
        code, out, err = await _run(grpcurl, "-plaintext", srv.address, "list")
        assert code == 0, err
        assert "decider.v1.DeciderService" in out.split()
        body = json.dumps({"model": "llama", "sessionId": "s1"})
        code, out, err = await _run(
            grpcurl, "-plaintext", "-d", body, srv.address, "decider.v1.DeciderService/Decide"
        )
        assert code == 0, err
        reply = json.loads(out)
        assert reply["endpoint"]["id"] in {"llama-0", "llama-1"}
        assert reply["strategy"] == "round_robin"
        code, out, err = await _run(
            grpcurl, "-plaintext", srv.address, "describe", "decider.v1.DeciderService.Decide"
        )
        assert code == 0, err
        assert (
            "rpc Decide ( .decider.v1.DecideRequest ) returns ( .decider.v1.DecideResponse )" in out
        )


class MethodRecorder(grpc.aio.ServerInterceptor):
    """Records the full method name of every call the server receives."""

    def __init__(self) -> None:
        self.methods: list[str] = []

    async def intercept_service(self, continuation, handler_call_details):
        self.methods.append(handler_call_details.method)
        return await continuation(handler_call_details)


V1 = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"
V1ALPHA = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"


def buf_binary() -> str:
    path = ROOT / ".tools" / "node_modules" / ".bin" / "buf"
    if not path.is_file():
        pytest.fail("buf not found in .tools/node_modules/.bin: run `make tools`")
    return str(path)


async def test_reflection_v1_answers_method_names_like_v1alpha(start_server):
    """The v1 service, called with v1 bytes, resolves what v1alpha resolves."""
    async with start_server() as srv:
        call = srv.channel.stream_stream(V1)(
            iter(
                [
                    reflection_pb2.ServerReflectionRequest(
                        file_containing_symbol="decider.v1.DeciderService.Decide"
                    ).SerializeToString(),
                    reflection_pb2.ServerReflectionRequest(
                        file_containing_symbol="decider.v1.DeciderService.NoSuchMethod"
                    ).SerializeToString(),
                ]
            ),
            timeout=5,
        )
        replies = [reflection_pb2.ServerReflectionResponse.FromString(raw) async for raw in call]
        files = replies[0].file_descriptor_response.file_descriptor_proto
        assert descriptor_pb2.FileDescriptorProto.FromString(files[0]).name == (
            "decider/v1/decider_service.proto"
        )
        assert replies[1].error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]


async def test_grpcurl_speaks_reflection_v1_and_describes_it(start_server):
    grpcurl = grpcurl_binary()
    recorder = MethodRecorder()
    async with start_server(interceptors=[recorder]) as srv:
        code, out, err = await _run(grpcurl, "-plaintext", srv.address, "list")
        assert code == 0, err
        assert {
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection",
        } <= set(out.split())
        code, out, err = await _run(
            grpcurl, "-plaintext", srv.address, "describe", "grpc.reflection.v1.ServerReflection"
        )
        assert code == 0, err
        assert "stream .grpc.reflection.v1.ServerReflectionRequest" in out
        code, out, err = await _run(
            grpcurl, "-plaintext", srv.address, "describe", "decider.v1.DeciderService.Decide"
        )
        assert code == 0, err
        assert "rpc Decide ( .decider.v1.DecideRequest )" in out
    # grpcurl asks v1 first and falls back to v1alpha only on UNIMPLEMENTED.
    assert V1 in recorder.methods
    assert V1ALPHA not in recorder.methods


@pytest.mark.parametrize(("protocol", "method"), [("grpc-v1", V1), ("grpc-v1alpha", V1ALPHA)])
async def test_buf_curl_lists_services_and_calls_over_each_reflection_protocol(
    start_server, protocol, method
):
    buf = buf_binary()
    recorder = MethodRecorder()
    doc = endpoints_doc("llama", 1)
    async with start_server(doc, interceptors=[recorder]) as srv:
        base = [buf, "curl", "--protocol", "grpc", "--http2-prior-knowledge"]
        code, out, err = await _run(
            *base, "--reflect-protocol", protocol, "--list-services", f"http://{srv.address}"
        )
        assert code == 0, err
        assert "decider.v1.DeciderService" in out.split()
        code, out, err = await _run(
            *base,
            "--reflect-protocol",
            protocol,
            "--data",
            json.dumps({"model": "llama"}),
            f"http://{srv.address}/decider.v1.DeciderService/Decide",
        )
        assert code == 0, err
        assert json.loads(out)["endpoint"]["id"] == "llama-0"
    used = {m for m in recorder.methods if m.startswith("/grpc.reflection.")}
    assert used == {method}
