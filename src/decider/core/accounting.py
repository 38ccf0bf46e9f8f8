"""How an outcome settles what its decision charged to the tenant's and the endpoint's budgets.

A decision charges one request and its estimated input tokens (in the engine's decide path);
the outcome replaces the estimate with the actual tokens. When the gateway reports the outcome
for another endpoint than the chosen one (a fallback served it), the chosen endpoint gets its
request and estimate back and the serving endpoint is charged what it served.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from decider.core.pending import Pending
from decider.core.stats import EndpointStats

if TYPE_CHECKING:
    from decider.core.state import EndpointBudgets, LoadStats, TenantBudgets


class Settlement:
    """Settles outcomes against the budget owners (core/state.py); keeps quota scores current."""

    __slots__ = ("_budgets", "_quotas_on", "_stats", "_tenants")

    def __init__(
        self,
        *,
        tenants: TenantBudgets,
        budgets: EndpointBudgets,
        stats: LoadStats,
        quotas_on: bool,
    ) -> None:
        self._tenants = tenants
        self._budgets = budgets
        self._stats = stats
        self._quotas_on = quotas_on

    def settle(
        self,
        pending: Pending,
        target: EndpointStats | None,
        *,
        actual: int,
        live: bool,
        now: float,
    ) -> None:
        """The outcome of `pending` arrived, served by `target` with `actual` tokens (0: not
        reported); `live` says whether the chosen endpoint is still registered."""
        chosen, tenant, estimate, _ = pending
        if self._quotas_on and actual:
            # Actual tokens replace the estimate charged at decide time.
            self._tenants.charge_tenant(tenant, requests=0, tokens=actual - estimate, now=now)
        endpoint = chosen.endpoint
        if live and (endpoint.requests_per_minute or endpoint.tokens_per_minute):
            if target is chosen:
                delta = actual - estimate if actual else 0
                self._budgets.charge_endpoint(chosen.id, requests=0, tokens=delta, now=now)
            else:
                self._budgets.charge_endpoint(chosen.id, requests=-1, tokens=-estimate, now=now)
            self._stats.set_quota_score(chosen, self._budgets.endpoint_headroom(chosen.id, now))

    def charge_served(self, target: EndpointStats, *, actual: int, now: float) -> None:
        """`target` served a request it was not chosen for (or one whose decision is unknown)."""
        endpoint = target.endpoint
        if (endpoint.requests_per_minute or endpoint.tokens_per_minute) and actual:
            self._budgets.charge_endpoint(target.id, requests=0, tokens=actual, now=now)
            self._stats.set_quota_score(target, self._budgets.endpoint_headroom(target.id, now))
