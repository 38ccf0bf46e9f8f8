"""The Endpoint Picker Protocol's names, and the adapter's settings (parsed by the config
loader, decider.config.extproc)."""

from __future__ import annotations

from decider.config.extproc import ExtProcSettings, HeaderNames

__all__ = [
    "DECIDER_NAMESPACE",
    "DESTINATION_HEADER",
    "LB_NAMESPACE",
    "OUTCOME_BY_OBSERVER",
    "OUTCOME_METADATA",
    "SUBSET_KEY",
    "SUBSET_NAMESPACE",
    "ExtProcSettings",
    "HeaderNames",
]

# The Endpoint Picker Protocol's names (Gateway API Inference Extension, llm-d-router).
DESTINATION_HEADER = "x-gateway-destination-endpoint"
LB_NAMESPACE = "envoy.lb"
SUBSET_NAMESPACE = "envoy.lb.subset_hint"
SUBSET_KEY = "x-gateway-destination-endpoint-subset"

# Decider's own names for the two-filter topology (examples/envoy/override_host_observer.yaml).
# The picker filter's grpc_service sends this gRPC metadata on each of its streams: a filter in
# observability mode reports the outcome, so the picker leaves it to that filter.
OUTCOME_METADATA = "x-decider-outcome"
OUTCOME_BY_OBSERVER = "observer"
# The dynamic metadata namespace the picker then names its decision in (decision_id, model,
# endpoint; strategy and reason with explain_headers), for the observer and the route's headers.
DECIDER_NAMESPACE = "decider"
