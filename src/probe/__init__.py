"""Active health checks, liveness checks and load scraping of endpoints, reported to a HealthSink.

Runs inside the decider (server.py wires an Engine in as the sink) or standalone as
`decider-probe`, which reports to a decider over RegistryService.ReportProbeResults.
"""

from .checks import CheckKind, ProbeResult
from .load import parse_load
from .prober import HealthSink, LoadExpiringSink, Prober
from .settings import ProbeSettings

__all__ = [
    "CheckKind",
    "HealthSink",
    "LoadExpiringSink",
    "ProbeResult",
    "ProbeSettings",
    "Prober",
    "parse_load",
]
