"""Helpers for the integration tests: endpoint tables and rich error details."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2

DETAILS_KEY = "grpc-status-details-bin"
ROOT = Path(__file__).resolve().parents[2]


def grpcurl_binary() -> str:
    """.tools/bin/grpcurl (`make tools`), else grpcurl on PATH, else ~/go/bin/grpcurl."""
    candidates = [ROOT / ".tools" / "bin" / "grpcurl"]
    on_path = shutil.which("grpcurl")
    if on_path:
        candidates.append(Path(on_path))
    candidates.append(Path.home() / "go" / "bin" / "grpcurl")
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    pytest.fail(
        "grpcurl not found in .tools/bin, on PATH or in ~/go/bin: run `make tools` "
        "(`make test` installs it)"
    )


def endpoints_doc(model: str, count: int, **extra: Any) -> dict[str, Any]:
    """A config document with `count` endpoints of `model` (no health_url: counted healthy)."""
    return {
        "endpoints": [
            {"id": f"{model}-{i}", "address": f"127.0.0.1:{20000 + i}", "model": model}
            for i in range(count)
        ],
        **extra,
    }


def rich_status(err: grpc.aio.AioRpcError) -> status_pb2.Status:
    for key, value in err.trailing_metadata() or ():
        if key == DETAILS_KEY:
            status = status_pb2.Status.FromString(value)
            assert status.code == err.code().value[0]
            assert status.message == err.details()
            return status
    raise AssertionError(f"no rich status details on {err.code()}: {err.details()}")


def detail(err: grpc.aio.AioRpcError, kind: type[Message]) -> Any:
    """The one detail of type `kind` in the error's google.rpc.Status."""
    found = [d for d in rich_status(err).details if d.Is(kind.DESCRIPTOR)]
    assert len(found) == 1, f"expected one {kind.__name__}, got {len(found)}"
    message = kind()
    found[0].Unpack(message)
    return message


ErrorInfo = error_details_pb2.ErrorInfo
RetryInfo = error_details_pb2.RetryInfo
QuotaFailure = error_details_pb2.QuotaFailure
BadRequest = error_details_pb2.BadRequest
