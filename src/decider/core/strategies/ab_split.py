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
from decider.core.stats import label_tags
from decider.core.strategies.base import Choice, PickContext, Ranked, Route
from decider.core.validation import Problems, allowed, position, schema, show

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
    # Required: empty is refused by parse_config.
    name: str = ""
    weight: int = field(default=1, metadata=allowed(ge=1))
    # Empty: the requested model.
    model: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class AbSplitConfig:
    arms: tuple[Arm, ...] = ()
    within: str = field(default="least_request", metadata=allowed(choices=tuple(sorted(_WITHIN))))


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
        problems = Problems()
        values = schema(AbSplitConfig, exclude=("arms",)).validate(
            options, path, problems, skip=("arms",)
        )
        raw = options.get("arms", [])
        where = (position(options, "arms"),)
        if not isinstance(raw, list):
            problems.add(where, f"{path}.arms: {show(raw)}, must be an array of tables")
            raw = []
        arms: list[Arm] = []
        for i, item in enumerate(raw):
            arm_path = f"{path}.arms[{i}]"
            arm = schema(Arm).validate(item, arm_path, problems, (*where, i))
            if arm is None:
                continue
            if not arm["name"]:
                problems.add(
                    (*where, i, position(item, "name")),
                    f"{arm_path}.name: missing, every arm needs a name",
                )
                continue
            arms.append(Arm(**{**arm, "labels": MappingProxyType(dict(arm["labels"]))}))
        names = [a.name for a in arms]
        for name in dict.fromkeys(n for n in names if names.count(n) > 1):
            problems.add(where, f"{path}.arms: arm name {name!r} used twice")
        problems.raise_any()
        assert values is not None
        return AbSplitConfig(arms=tuple(arms), **values)

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
