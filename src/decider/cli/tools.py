"""`decider endpoints` and `decider decide`: operator commands over the public gRPC API.

They are ordinary clients of a running server (ListEndpoints, Decide), so what they print is
what any gateway would see. gRPC errors are reported in one place, `run`, as `code: message`.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any, TextIO

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message

from decider.codec.convert import duration_s
from decider.config.tls import ClientTLS, add_client_arguments
from decider.v1 import decider_service_pb2 as dpb
from decider.v1 import decider_service_pb2_grpc as dgrpc
from decider.v1 import endpoint_pb2 as epb
from decider.v1 import registry_service_pb2 as rpb
from decider.v1 import registry_service_pb2_grpc as rgrpc

__all__ = ["COMMANDS", "add_parsers", "run"]

COMMANDS = ("endpoints", "decide")
EXIT_RPC_ERROR = 1
DEFAULT_TARGET = "127.0.0.1:50051"


def add_parsers(sub: Any) -> None:
    """Adds the commands to `decider`'s subparsers."""
    endpoints = sub.add_parser(
        "endpoints", help="list endpoints with health, breaker, in-flight and latency"
    )
    _common(endpoints)
    endpoints.add_argument(
        "--admin-token",
        default=os.environ.get("DECIDER_ADMIN_TOKEN", ""),
        help="bearer token, when the server has one (default: $DECIDER_ADMIN_TOKEN)",
    )
    endpoints.add_argument("--model", default="", help="only endpoints of this model")

    decide = sub.add_parser("decide", help="ask for one routing decision")
    _common(decide)
    decide.add_argument("--model", required=True, help="model the request asks for")
    decide.add_argument("--session", default="", help="session id, for sticky routing")
    decide.add_argument("--tenant", default="", help="tenant charged against quotas")
    decide.add_argument("--strategy", default="", help="strategy wire name (default: server's)")
    decide.add_argument(
        "--capability",
        action="append",
        default=[],
        help="required capability; repeat for several",
    )
    decide.add_argument(
        "--explain",
        action="store_true",
        help="explain mode: print every candidate's scores or skip reason; changes no state",
    )


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--target",
        default=os.environ.get("DECIDER_TARGET", DEFAULT_TARGET),
        help=f"HOST:PORT of the server (default: $DECIDER_TARGET or {DEFAULT_TARGET})",
    )
    parser.add_argument("--timeout-s", type=float, default=5.0, help="deadline of the call")
    parser.add_argument("--json", action="store_true", help="print the response as JSON")
    add_client_arguments(parser, os.environ)


def run(args: argparse.Namespace, *, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    try:
        with ClientTLS.from_args(args).channel(args.target) as channel:
            if args.command == "endpoints":
                return _endpoints(channel, args, out)
            return _decide(channel, args, out)
    except grpc.RpcError as exc:
        code = exc.code().name if isinstance(exc, grpc.Call) else "UNKNOWN"
        details = exc.details() if isinstance(exc, grpc.Call) else str(exc)
        print(f"decider {args.command}: {code}: {details}", file=sys.stderr)
        return EXIT_RPC_ERROR


def _endpoints(channel: grpc.Channel, args: argparse.Namespace, out: TextIO) -> int:
    stub = rgrpc.RegistryServiceStub(channel)
    metadata = (("authorization", f"Bearer {args.admin_token}"),) if args.admin_token else None
    reply: rpb.ListEndpointsResponse = stub.ListEndpoints(
        rpb.ListEndpointsRequest(model=args.model), timeout=args.timeout_s, metadata=metadata
    )
    if args.json:
        print(_json(reply), file=out)
        return 0
    rows = [["ID", "MODEL", "ADDRESS", "HEALTH", "BREAKER", "IN-FLIGHT", "LATENCY", "REASON"]]
    for endpoint in reply.endpoints:
        status = reply.statuses.get(endpoint.id, epb.EndpointStatus())
        latency_s = duration_s(status.latency_ewma)
        rows.append(
            [
                endpoint.id,
                endpoint.model,
                endpoint.address,
                _enum_name(epb.HealthStatus, status.health, "HEALTH_STATUS_"),
                _enum_name(epb.BreakerState, status.breaker_state, "BREAKER_STATE_"),
                str(status.in_flight),
                f"{latency_s * 1000:.0f} ms" if latency_s else "-",
                _reason(status),
            ]
        )
    _table(rows, out)
    if not reply.endpoints:
        print("(no endpoints" + (f" for model {args.model!r})" if args.model else ")"), file=out)
    return 0


def _reason(status: epb.EndpointStatus) -> str:
    """The health reason, and the breaker's while it is open or half-open."""
    parts = [r for r in (status.health_reason, status.breaker_reason) if r]
    return "; ".join(parts) or "-"


def _decide(channel: grpc.Channel, args: argparse.Namespace, out: TextIO) -> int:
    stub = dgrpc.DeciderServiceStub(channel)
    request = dpb.DecideRequest(
        model=args.model,
        session_id=args.session,
        tenant=args.tenant,
        strategy=args.strategy,
        required_capabilities=args.capability,
        explain=args.explain,
    )
    reply: dpb.DecideResponse = stub.Decide(request, timeout=args.timeout_s)
    if args.json:
        print(_json(reply), file=out)
        return 0
    print(f"endpoint   {reply.endpoint.id} ({reply.endpoint.address})", file=out)
    fallbacks = ", ".join(e.id for e in reply.fallbacks) or "-"
    print(f"fallbacks  {fallbacks}", file=out)
    print(
        f"strategy   {reply.strategy}" + (" (affinity hit)" if reply.affinity_hit else ""), file=out
    )
    print(f"reason     {reply.reason}", file=out)
    if reply.scores:
        print(f"scores     {_scores(reply.scores)}", file=out)
    skipped = ", ".join(f"{n} {reason}" for reason, n in sorted(reply.skipped.items()))
    print(
        f"candidates {reply.candidate_count}" + (f" (skipped: {skipped})" if skipped else ""),
        file=out,
    )
    if reply.decision_id:
        print(f"decision   {reply.decision_id}", file=out)
    if args.explain:
        print(file=out)
        rows = [["RANK", "ENDPOINT", "TOTAL", "HEALTH", "BREAKER", "IN-FLIGHT", "SCORES / SKIPPED"]]
        ordered = sorted(reply.candidates, key=lambda c: (c.rank == 0, c.rank, c.endpoint_id))
        for c in ordered:
            rows.append(
                [
                    str(c.rank) if c.rank else "-",
                    c.endpoint_id,
                    f"{c.total_score:.3f}" if c.rank else "-",
                    _enum_name(epb.HealthStatus, c.health, "HEALTH_STATUS_"),
                    _enum_name(epb.BreakerState, c.breaker_state, "BREAKER_STATE_"),
                    str(c.in_flight),
                    f"skipped: {c.skip_reason}" if c.skip_reason else _scores(c.scores),
                ]
            )
        _table(rows, out)
    return 0


def _scores(scores: Any) -> str:
    return " ".join(f"{name}={value:.2f}" for name, value in sorted(scores.items()))


def _enum_name(enum: Any, value: int, prefix: str) -> str:
    try:
        name: str = enum.Name(value)
    except ValueError:
        return str(value)
    return name.removeprefix(prefix).lower()


def _json(message: Message) -> str:
    return json_format.MessageToJson(message, preserving_proto_field_name=True, indent=2)


def _table(rows: Sequence[Sequence[str]], out: TextIO) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=True)]
        print("  ".join(cells).rstrip(), file=out)
