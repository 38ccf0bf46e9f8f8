"""The Endpoint Picker Protocol's names, and the adapter's settings (parsed by the config
loader, decider.config.extproc)."""

from __future__ import annotations

from decider.config.extproc import ExtProcSettings, HeaderNames

__all__ = [
    "DESTINATION_HEADER",
    "LB_NAMESPACE",
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
