"""What the gRPC benchmark sends: the server's configuration (100 endpoints of one model), the
calls and their ghz templates, the binary requests h2load sends, and ghz's protoset."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

MODEL = "llama-3-8b"
ENDPOINTS = 100
CHECK = "grpc.health.v1.Health/Check"
DECIDE = "decider.v1.DeciderService/Decide"
REPORT = "decider.v1.DeciderService/ReportOutcome"
STREAM = "/decider.v1.DeciderService/DecideStream"
# ghz renders these per request: 1000 sessions, 16 shared system prompts, 256 conversations.
DECIDE_DATA = json.dumps(
    {
        "model": MODEL,
        "session_id": "session-{{mod .RequestNumber 1000}}",
        "tenant": "bench",
        "estimated_input_tokens": 800,
        "prefix_hashes": [
            "{{add 1000 (mod .RequestNumber 16)}}",
            "{{add 5000 (mod .RequestNumber 256)}}",
        ],
    }
)
REPORT_DATA = json.dumps(
    {
        "decision_id": "bench-{{.RequestNumber}}",
        "endpoint_id": "ep-{{mod .RequestNumber 100}}",
        "result": "RESULT_SUCCESS",
        "latency": "0.850s",
        "input_tokens": 800,
        "output_tokens": 120,
    }
)
CHECK_DATA = json.dumps({"service": ""})


def check_msg(i: int = 0) -> Any:
    from grpc_health.v1 import health_pb2

    return health_pb2.HealthCheckRequest(service="")


def decide_msg(i: int = 0) -> Any:
    """The binary twin of DECIDE_DATA's request number i, for h2load."""
    from decider.v1 import decider_service_pb2 as dpb

    return dpb.DecideRequest(
        model=MODEL,
        session_id=f"session-{i % 1000}",
        tenant="bench",
        estimated_input_tokens=800,
        prefix_hashes=[1000 + i % 16, 5000 + i % 256],
    )


def write_protoset(path: Path) -> None:
    """A FileDescriptorSet for ghz from the generated modules (no reflection round trips)."""
    from google.protobuf import descriptor_pb2
    from grpc_health.v1 import health_pb2

    from decider.v1 import decider_service_pb2

    files = descriptor_pb2.FileDescriptorSet()
    seen: set[str] = set()

    def add(fd: Any) -> None:
        if fd.name in seen:
            return
        seen.add(fd.name)
        for dep in fd.dependencies:
            add(dep)
        proto = descriptor_pb2.FileDescriptorProto()
        fd.CopyToProto(proto)
        files.file.append(proto)

    add(decider_service_pb2.DESCRIPTOR)
    add(health_pb2.DESCRIPTOR)
    path.write_bytes(files.SerializeToString())


def write_config(path: Path) -> None:
    lines = ["[routing]", 'default_strategy = "composite"', ""]
    for i in range(ENDPOINTS):
        lines += [
            "[[endpoints]]",
            f'id = "ep-{i}"',
            f'address = "10.0.{i // 200}.{i % 200 + 1}:8000"',
            f'model = "{MODEL}"',
            "",
        ]
    path.write_text("\n".join(lines))
