"""Validity of health results pushed by standalone probers (RegistryService.ReportProbeResults).

Each report is valid for the `valid_for` its prober sent. When a prober goes quiet, its results
expire and the endpoint's health returns to UNKNOWN with a reason that says so; the server's
tick loop applies the expiries. Only this class holds the deadlines.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class _Report:
    prober_id: str
    received_at: float
    valid_until: float


@dataclass(frozen=True, slots=True)
class Expired:
    endpoint_id: str
    reason: str


class ProbeReports:
    def __init__(self) -> None:
        self._reports: dict[str, _Report] = {}

    def record(self, endpoint_id: str, *, prober_id: str, valid_for_s: float, now: float) -> None:
        """A fresh result; `valid_for_s` <= 0 means it never goes stale."""
        if valid_for_s > 0:
            self._reports[endpoint_id] = _Report(prober_id, now, now + valid_for_s)
        else:
            self._reports.pop(endpoint_id, None)

    def expire(self, *, now: float) -> list[Expired]:
        """Results whose validity ended, removed so each expires once."""
        expired = [(i, r) for i, r in self._reports.items() if r.valid_until <= now]
        for endpoint_id, _ in expired:
            del self._reports[endpoint_id]
        return [
            Expired(
                endpoint_id,
                f"{r.prober_id}: results stale (no report for {now - r.received_at:.0f} s)",
            )
            for endpoint_id, r in expired
        ]

    def retain(self, endpoint_ids: set[str]) -> None:
        """Forgets endpoints that left the registry."""
        for endpoint_id in [i for i in self._reports if i not in endpoint_ids]:
            del self._reports[endpoint_id]
