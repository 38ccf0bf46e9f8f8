"""Envoy's ext_proc endpoint-picker protocol over Decider's decide path (docs/ENVOY.md)."""

from decider.api.extproc.service import SERVICE, ExtProcService, add_to_server
from decider.api.extproc.settings import ExtProcSettings, HeaderNames

__all__ = ["SERVICE", "ExtProcService", "ExtProcSettings", "HeaderNames", "add_to_server"]
