"""ab_split: split traffic between arms (models or endpoint groups selected by labels) by weight,
deterministically per session: a session hashes to a fixed point in [0, 1), so a user stays on one
arm for as long as the weights stay. Within the arm, `within` picks the endpoint. When the arm has
no usable endpoint the next arm takes the request, and the reason says so.

    [routing.ab_split]
    within = "least_request"
    arms = [
      { name = "control", weight = 70 },                        # the requested model
      { name = "candidate", model = "qwen-72b", weight = 30 },
      # or: { name = "canary", labels = { track = "canary" }, weight = 5 }
    ]
"""

from __future__ import annotations

import bisect
import random
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, ClassVar

from decider.core.model import RouteRequest
from decider.core.readers import as_table, check_keys, get_int, get_str
from decider.core.stats import label_tags
from decider.core.strategies.base import Choice, PickContext, Ranked, Route
from decider.errors import ConfigError

_WITHIN = frozenset(
    {
        "round_robin",
        "weighted_round_robin",
        "random",
        "weighted_random",
        "least_request",
        "latency",
        "cache_aware",
        "quota_aware",
        "cost",
        "composite",
        "affinity",
    }
)


@dataclass(frozen=True, slots=True, kw_only=True)
class Arm:
    name: str
    weight: int
    # Empty: the requested model.
    model: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class AbSplitConfig:
    arms: tuple[Arm, ...] = ()
    within: str = "least_request"


def _parse_arm(value: Any, path: str) -> Arm:
    table = as_table(value, path)
    check_keys(table, {"name", "weight", "model", "labels"}, path)
    name = get_str(table, "name", "", path)
    if not name:
        raise ConfigError(f"{path}.name: missing, every arm needs a name")
    labels = as_table(table.get("labels", {}), f"{path}.labels")
    for key, label in labels.items():
        if not isinstance(label, str):
            raise ConfigError(f"{path}.labels.{key}: {label!r}, must be a string")
    return Arm(
        name=name,
        weight=get_int(table, "weight", 1, path, minimum=1),
        model=get_str(table, "model", "", path),
        labels=MappingProxyType(dict(labels)),
    )


def session_point(key: str) -> float:
    """A stable point in [0, 1) for a session (CRC-32: the same on every process and machine,
    unlike hash())."""
    return zlib.crc32(key.encode()) / 4294967296.0


class AbSplit:
    name: ClassVar[str] = "ab_split"

    def __init__(self, config: AbSplitConfig, rng: random.Random) -> None:
        self._config = config
        self._rng = rng
        total = sum(a.weight for a in self._config.arms)
        bounds = []
        running = 0
        for arm in self._config.arms:
            running += arm.weight
            bounds.append(running / total)
        self._bounds = bounds
        # Everything per arm that does not depend on the request, built once.
        arms = self._config.arms
        self._tags = [label_tags(a.labels) for a in arms]
        self._orders = [
            [first, *(i for i in range(len(arms)) if i != first)] for first in range(len(arms))
        ]
        self._notes = [
            [
                f"ab_split: arm {arm.name} ({arm.weight / total:.0%})"
                + ("" if i == first else f" after arm {arms[first].name} had no usable endpoint")
                + "; "
                for i, arm in enumerate(arms)
            ]
            for first in range(len(arms))
        ]
        self._no_arms = "ab_split: no arms configured; "
        # Routes per (first arm, model, capabilities): built once, not per decision.
        self._routes: dict[tuple[int, str, frozenset[str]], list[Route]] = {}

    @staticmethod
    def parse_config(options: Mapping[str, Any], path: str) -> AbSplitConfig:
        check_keys(options, {"arms", "within"}, path)
        raw = options.get("arms", [])
        if not isinstance(raw, list):
            raise ConfigError(f"{path}.arms: {raw!r}, must be an array of tables")
        arms = tuple(_parse_arm(a, f"{path}.arms[{i}]") for i, a in enumerate(raw))
        names = [a.name for a in arms]
        for name in names:
            if names.count(name) > 1:
                raise ConfigError(f"{path}.arms: arm name {name!r} used twice")
        return AbSplitConfig(
            arms=arms,
            within=get_str(options, "within", "least_request", path, choices=_WITHIN),
        )

    @property
    def within(self) -> str:
        return self._config.within

    def routes(self, request: RouteRequest) -> Sequence[Route]:
        """The arms to try, the session's own first (the Splitter hook)."""
        arms = self._config.arms
        caps = request.required_capabilities
        if not arms:
            return [Route(model=request.model, capabilities=caps, note=self._no_arms)]
        session = request.session_id or request.request_id
        if session:
            point = session_point(session)
        elif request.explain:
            point = 0.0
        else:
            point = self._rng.random()
        first = min(bisect.bisect_right(self._bounds, point), len(arms) - 1)
        route_key = (first, request.model, caps)
        routes = self._routes.get(route_key)
        if routes is None:
            routes = []
            for i in self._orders[first]:
                tags = self._tags[i]
                routes.append(
                    Route(
                        model=arms[i].model or request.model,
                        capabilities=caps | tags if tags else caps,
                        note=self._notes[first][i],
                    )
                )
            if len(self._routes) >= 1024:
                self._routes.clear()
            self._routes[route_key] = routes
        return routes

    # The engine routes a Splitter itself (per route, with `within`); these keep the Strategy
    # shape.
    def choose(self, ctx: PickContext) -> Choice:
        return ctx.strategies[self._config.within].choose(ctx)

    def rank(self, ctx: PickContext) -> list[Ranked]:
        return ctx.strategies[self._config.within].rank(ctx)
