"""A typed asyncio client for Decider: decide, try, fall back, report, and fail open.

async with DeciderClient("127.0.0.1:50051", fail_open=True, watch=True) as decider:
    routed = await decider.route(DecideRequest(model="llama-3-8b"), send_to_endpoint)
"""

from decider.v1.decider_service_pb2 import DecideRequest
from decider_client._client import (
    REASON_NO_HEALTHY_ENDPOINT,
    REASON_SERVER_OVERLOADED,
    REASON_SHUTTING_DOWN,
    Attempt,
    AttemptFn,
    AttemptsExhausted,
    DeciderClient,
    DeciderUnreachable,
    Decision,
    HealthView,
    Outcome,
    Routed,
    Stats,
    is_no_healthy_endpoint,
    is_unreachable,
    retry_after_s,
)

__all__ = [
    "REASON_NO_HEALTHY_ENDPOINT",
    "REASON_SERVER_OVERLOADED",
    "REASON_SHUTTING_DOWN",
    "Attempt",
    "AttemptFn",
    "AttemptsExhausted",
    "DecideRequest",
    "DeciderClient",
    "DeciderUnreachable",
    "Decision",
    "HealthView",
    "Outcome",
    "Routed",
    "Stats",
    "is_no_healthy_endpoint",
    "is_unreachable",
    "retry_after_s",
]
