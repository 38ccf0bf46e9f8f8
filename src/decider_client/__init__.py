"""A typed asyncio client for Decider: decide, try, fall back, report, and fail open.

    options = ClientOptions(fail_open=True, watch=True)
    async with DeciderClient("127.0.0.1:50051", options) as decider:
        routed = await decider.route(decide_request(body, session_id="u42"), send_to_endpoint)

Modules (all private; this package's names are the public surface): _client (DeciderClient),
_options (ClientOptions, TlsOptions), _errors (the error tree and the gRPC status boundary),
_results (Decision, Attempt, Outcome, Routed, Stats), _route (the retry loop), _stream
(streaming mode), _view (the local health view and fail-open choice), _watch (WatchHealth),
_prefix (prefix hashes and token estimates from an OpenAI body).
"""

from decider.v1.decider_service_pb2 import DecideRequest
from decider_client._client import DeciderClient
from decider_client._errors import (
    REASON_NO_HEALTHY_ENDPOINT,
    REASON_QUOTA_EXHAUSTED,
    REASON_SERVER_OVERLOADED,
    REASON_SHUTTING_DOWN,
    AttemptsExhausted,
    DeciderClientError,
    DeciderUnreachable,
    InvalidRequest,
    NoHealthyEndpoint,
    NotFound,
    QuotaExceeded,
    Refused,
    RpcStatus,
    Unauthenticated,
    is_no_healthy_endpoint,
    is_unreachable,
    retry_after_s,
)
from decider_client._options import ClientOptions, TlsOptions
from decider_client._prefix import PromptSignals, decide_request, prompt_signals
from decider_client._results import Attempt, AttemptFn, Decision, Outcome, Routed, Stats
from decider_client._view import HealthView

__all__ = [
    "REASON_NO_HEALTHY_ENDPOINT",
    "REASON_QUOTA_EXHAUSTED",
    "REASON_SERVER_OVERLOADED",
    "REASON_SHUTTING_DOWN",
    "Attempt",
    "AttemptFn",
    "AttemptsExhausted",
    "ClientOptions",
    "DecideRequest",
    "DeciderClient",
    "DeciderClientError",
    "DeciderUnreachable",
    "Decision",
    "HealthView",
    "InvalidRequest",
    "NoHealthyEndpoint",
    "NotFound",
    "Outcome",
    "PromptSignals",
    "QuotaExceeded",
    "Refused",
    "Routed",
    "RpcStatus",
    "Stats",
    "TlsOptions",
    "Unauthenticated",
    "decide_request",
    "is_no_healthy_endpoint",
    "is_unreachable",
    "prompt_signals",
    "retry_after_s",
]
