"""Token buckets for tenant quotas and endpoint capacity (requests and tokens per minute).

A bucket holds up to its per-minute limit and refills continuously at limit/60 per second, so a
tenant may burst a minute's budget and then runs at the steady rate. A decision charges the
estimated tokens; the outcome replaces the estimate with the actual count (the bucket may go into
debt, which later refill repays).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import islice

from decider.core.model import QuotaViolation, StateUsage
from decider.core.settings import QuotaSettings, TenantQuota


class TokenBucket:
    __slots__ = ("capacity", "level", "rate_per_s", "updated_at")

    def __init__(self, per_minute: int, *, now: float) -> None:
        self.capacity = float(per_minute)
        self.rate_per_s = per_minute / 60.0
        self.level = self.capacity
        self.updated_at = now

    def refill(self, now: float) -> float:
        if now > self.updated_at:
            self.level = min(self.capacity, self.level + (now - self.updated_at) * self.rate_per_s)
            self.updated_at = now
        return self.level

    def wait_s(self, amount: float, now: float) -> float:
        """Seconds until `amount` is available (0 when it is now). Asks beyond the capacity are
        treated as a full bucket, so they wait for one but are not refused forever."""
        need = min(amount, self.capacity) - self.refill(now)
        return 0.0 if need <= 0.0 else need / self.rate_per_s

    def take(self, amount: float, now: float) -> None:
        self.refill(now)
        self.level -= amount

    def headroom(self, now: float) -> float:
        """Share of the bucket left, 0.0 to 1.0."""
        return max(0.0, self.refill(now)) / self.capacity


@dataclass(frozen=True, slots=True, kw_only=True)
class QuotaCheck:
    retry_after_s: float
    violations: tuple[QuotaViolation, ...]


class _Pair:
    __slots__ = ("requests", "tokens")

    def __init__(self, limits: TenantQuota, now: float) -> None:
        rpm, tpm = limits.requests_per_minute, limits.tokens_per_minute
        self.requests = TokenBucket(rpm, now=now) if rpm else None
        self.tokens = TokenBucket(tpm, now=now) if tpm else None

    def check(self, subject: str, tokens: int, now: float) -> QuotaCheck | None:
        violations: list[QuotaViolation] = []
        wait = 0.0
        if self.requests is not None:
            w = self.requests.wait_s(1.0, now)
            if w > 0.0:
                wait = max(wait, w)
                violations.append(
                    QuotaViolation(
                        subject=subject,
                        description=(
                            f"requests_per_minute: limit {self.requests.capacity:.0f},"
                            f" {max(0.0, self.requests.level):.0f} left"
                        ),
                    )
                )
        if self.tokens is not None and tokens > 0:
            w = self.tokens.wait_s(float(tokens), now)
            if w > 0.0:
                wait = max(wait, w)
                violations.append(
                    QuotaViolation(
                        subject=subject,
                        description=(
                            f"tokens_per_minute: limit {self.tokens.capacity:.0f},"
                            f" {max(0.0, self.tokens.level):.0f} left, {tokens} asked"
                        ),
                    )
                )
        if not violations:
            return None
        return QuotaCheck(retry_after_s=wait, violations=tuple(violations))

    def charge(self, requests: int, tokens: int, now: float) -> None:
        if self.requests is not None and requests:
            self.requests.take(float(requests), now)
        if self.tokens is not None and tokens:
            self.tokens.take(float(tokens), now)

    def full(self, now: float) -> bool:
        """Both buckets refilled: the pair is the same as a new one."""
        for bucket in (self.requests, self.tokens):
            if bucket is not None and bucket.refill(now) < bucket.capacity:
                return False
        return True

    def headroom(self, now: float) -> float:
        share = 1.0
        if self.requests is not None:
            share = self.requests.headroom(now)
        if self.tokens is not None:
            share = min(share, self.tokens.headroom(now))
        return share


class QuotaLedger:
    """Owns every bucket: one pair per tenant with a limit, one per endpoint with a capacity.

    Tenant buckets are kept only for tenants with a limit, only while they carry something (a
    refilled pair is the same as a new one: `expire_tenants` drops those), and at most
    `max_tenants` of them: past that, refilled ones go first, then the oldest eighth."""

    def __init__(self, settings: QuotaSettings) -> None:
        self._settings = settings
        self._tenants: dict[str, _Pair] = {}
        self._endpoints: dict[str, _Pair] = {}
        self._max_tenants = settings.max_tenants
        # Tenant buckets dropped by the size bound while still partly spent.
        self.evicted = 0

    # -- tenants ---------------------------------------------------------------------------------

    def _tenant(self, tenant: str, now: float) -> _Pair | None:
        pair = self._tenants.get(tenant)
        if pair is not None:
            return pair
        limits = self._settings.for_tenant(tenant)
        if not (limits.requests_per_minute or limits.tokens_per_minute):
            return None
        if len(self._tenants) >= self._max_tenants:
            self._shrink(now)
        pair = self._tenants[tenant] = _Pair(limits, now)
        return pair

    def _shrink(self, now: float) -> None:
        """Makes room for one more tenant."""
        self.expire_tenants(now)
        excess = len(self._tenants) + 1 - self._max_tenants
        if excess > 0:
            drop = excess + self._max_tenants // 8
            self._tenants = dict(islice(self._tenants.items(), drop, None))
            self.evicted += drop

    def expire_tenants(self, now: float) -> int:
        """Drops the buckets that have refilled; how many (O(tenants): the engine calls it about
        once a minute, the time a bucket takes to refill)."""
        kept = {t: pair for t, pair in self._tenants.items() if not pair.full(now)}
        dropped = len(self._tenants) - len(kept)
        if dropped:
            self._tenants = kept
        return dropped

    def usage(self) -> StateUsage:
        return StateUsage(entries=len(self._tenants), limit=self._max_tenants, evicted=self.evicted)

    def check_tenant(self, tenant: str, tokens: int, now: float) -> QuotaCheck | None:
        """None when the tenant may make a request estimated at `tokens`."""
        pair = self._tenant(tenant, now)
        if pair is None:
            return None
        return pair.check(f"tenant:{tenant}", tokens, now)

    def charge_tenant(self, tenant: str, *, requests: int, tokens: int, now: float) -> None:
        pair = self._tenant(tenant, now)
        if pair is not None:
            pair.charge(requests, tokens, now)

    # -- endpoints -------------------------------------------------------------------------------

    def set_endpoint_limits(
        self, endpoint_id: str, *, requests_per_minute: int, tokens_per_minute: int, now: float
    ) -> None:
        if not requests_per_minute and not tokens_per_minute:
            self._endpoints.pop(endpoint_id, None)
            return
        limits = TenantQuota(
            requests_per_minute=requests_per_minute, tokens_per_minute=tokens_per_minute
        )
        current = self._endpoints.get(endpoint_id)
        if current is not None and _same_limits(current, limits):
            return
        self._endpoints[endpoint_id] = _Pair(limits, now)

    def remove_endpoint(self, endpoint_id: str) -> None:
        self._endpoints.pop(endpoint_id, None)

    def endpoint_has_room(self, endpoint_id: str, tokens: int, now: float) -> bool:
        pair = self._endpoints.get(endpoint_id)
        return pair is None or pair.check("", tokens, now) is None

    def charge_endpoint(self, endpoint_id: str, *, requests: int, tokens: int, now: float) -> None:
        pair = self._endpoints.get(endpoint_id)
        if pair is not None:
            pair.charge(requests, tokens, now)

    def endpoint_headroom(self, endpoint_id: str, now: float) -> float:
        """Share of the endpoint's tighter per-minute budget left; 1.0 when it has none."""
        pair = self._endpoints.get(endpoint_id)
        return 1.0 if pair is None else pair.headroom(now)


def _same_limits(pair: _Pair, limits: TenantQuota) -> bool:
    rpm = pair.requests.capacity if pair.requests is not None else 0.0
    tpm = pair.tokens.capacity if pair.tokens is not None else 0.0
    return rpm == limits.requests_per_minute and tpm == limits.tokens_per_minute
