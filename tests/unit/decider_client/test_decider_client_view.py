"""DeciderClient's local view and error classification, without a server or sockets."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2, status_pb2

from decider.v1 import decider_service_pb2 as dpb
from decider.v1 import endpoint_pb2 as epb
from decider_client import (
    ClientOptions,
    DeciderClient,
    DeciderUnreachable,
    Outcome,
    is_no_healthy_endpoint,
    is_unreachable,
    retry_after_s,
)
from decider_client._errors import error_for_status, status_of


def ep(ep_id: str, model: str = "m", caps: tuple[str, ...] = ()) -> epb.Endpoint:
    return epb.Endpoint(id=ep_id, address=f"{ep_id}:80", model=model, capabilities=caps)


def aio_error(code: grpc.StatusCode, *details: object) -> grpc.aio.AioRpcError:
    metadata: tuple[tuple[str, bytes], ...] = ()
    if details:
        status = status_pb2.Status(code=code.value[0], message="m")
        for d in details:
            status.details.add().Pack(d)
        metadata = (("grpc-status-details-bin", status.SerializeToString()),)
    return grpc.aio.AioRpcError(
        code, grpc.aio.Metadata(), grpc.aio.Metadata(*metadata), details="m"
    )


def unreachable(err: grpc.aio.AioRpcError) -> DeciderUnreachable:
    mapped = error_for_status(status_of(err))
    assert isinstance(mapped, DeciderUnreachable)
    return mapped


@pytest.mark.parametrize(
    ("err", "unreachable", "no_healthy", "retry_after"),
    [
        (
            aio_error(
                grpc.StatusCode.UNAVAILABLE,
                error_details_pb2.ErrorInfo(reason="NO_HEALTHY_ENDPOINT"),
            ),
            False,
            True,
            0.0,
        ),
        (
            aio_error(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=2)),
            ),
            False,
            False,
            2.0,
        ),
        (aio_error(grpc.StatusCode.NOT_FOUND), False, False, 0.0),
        (
            aio_error(
                grpc.StatusCode.UNAVAILABLE, error_details_pb2.ErrorInfo(reason="SHUTTING_DOWN")
            ),
            True,
            False,
            0.0,
        ),
        (
            aio_error(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                error_details_pb2.ErrorInfo(reason="SERVER_OVERLOADED"),
            ),
            True,
            False,
            0.0,
        ),
        (aio_error(grpc.StatusCode.UNAVAILABLE), True, False, 0.0),
        (aio_error(grpc.StatusCode.DEADLINE_EXCEEDED), True, False, 0.0),
        (ConnectionRefusedError(), True, False, 0.0),
    ],
)
def test_errors_are_classified(err, unreachable, no_healthy, retry_after):
    assert is_unreachable(err) is unreachable
    assert is_no_healthy_endpoint(err) is no_healthy
    assert retry_after_s(err) == retry_after


async def test_fail_open_prefers_healthy_rotates_and_filters():
    client = DeciderClient(
        "127.0.0.1:1",
        ClientOptions(
            fail_open=True,
            seed_endpoints=[
                ep("a"),
                ep("b"),
                ep("c"),
                ep("d"),
                ep("v", caps=("vision",)),
                ep("x", "o"),
            ],
        ),
    )
    try:
        client._view.apply(
            dpb.WatchHealthResponse(
                snapshot=True,
                events=[
                    dpb.HealthEvent(endpoint_id="b", model="m", status=epb.HEALTH_STATUS_UNHEALTHY),
                    dpb.HealthEvent(
                        endpoint_id="c", model="m", breaker_state=epb.BREAKER_STATE_OPEN
                    ),
                    dpb.HealthEvent(endpoint_id="d", model="m", status=epb.HEALTH_STATUS_DEGRADED),
                ],
            )
        )
        assert client.health_snapshots == 1
        down = unreachable(aio_error(grpc.StatusCode.UNAVAILABLE))
        firsts = set()
        for _ in range(4):
            decision = client._decide_locally(dpb.DecideRequest(model="m"), down)
            ids = [decision.endpoint.id, *(f.id for f in decision.fallbacks)]
            assert decision.fail_open and decision.decision_id == ""
            assert sorted(ids[:2]) == ["a", "v"] and ids[2] == "d"  # degraded last
            firsts.add(ids[0])
        assert firsts == {"a", "v"}

        vision = client._decide_locally(
            dpb.DecideRequest(model="m", required_capabilities=["vision"]), down
        )
        assert vision.endpoint.id == "v" and not vision.fallbacks

        client._view.apply(
            dpb.WatchHealthResponse(events=[dpb.HealthEvent(endpoint_id="a", removed=True)])
        )
        assert [e.id for e in client.known_endpoints("m")] == ["b", "c", "d", "v"]
        with pytest.raises(DeciderUnreachable):
            client._decide_locally(dpb.DecideRequest(model="never-seen"), down)
    finally:
        await client.close()


def test_outcome_carries_latency_tokens_and_ttft():
    req = Outcome(
        decision_id="d",
        endpoint_id="a",
        result=dpb.RESULT_SUCCESS,
        latency_s=0.25,
        input_tokens=21,
        output_tokens=7,
        time_to_first_token_s=0.05,
    ).to_proto()
    assert req.latency.ToNanoseconds() == 250_000_000
    assert req.time_to_first_token.ToNanoseconds() == 50_000_000
    assert (req.input_tokens, req.output_tokens) == (21, 7)
    assert (
        not Outcome(decision_id="", endpoint_id="a", result=dpb.RESULT_ERROR, latency_s=0.1)
        .to_proto()
        .HasField("time_to_first_token")
    )
