"""registry.py: membership, snapshots, validation and the SQLite store."""

from __future__ import annotations

import pytest

from decider.core.model import Endpoint, MetricsKind
from decider.errors import InvalidArgument, NotFound
from decider.state.probe_reports import ProbeReports
from decider.state.registry import EndpointStore, Registry, check_endpoint


def _ep(id_: str, **kw) -> Endpoint:
    kw.setdefault("address", "10.0.0.1:8000")
    kw.setdefault("model", "m")
    return Endpoint(id=id_, **kw)


def test_snapshots_are_immutable_and_replaced_on_every_change():
    registry = Registry([_ep("c", source="config")])
    seen: list[tuple[Endpoint, ...]] = []
    registry.subscribe(seen.append)
    before = registry.snapshot()
    assert registry.register(_ep("a"))
    assert not registry.register(_ep("a", weight=3))
    registry.deregister("c")
    assert isinstance(before, tuple)
    assert [e.id for e in before] == ["c"]
    assert [[e.id for e in s] for s in seen] == [["a", "c"], ["a", "c"], ["a"]]
    assert registry.get("a") is not None and registry.get("a").weight == 3


def test_registered_endpoint_replaces_a_config_one_with_the_same_id():
    registry = Registry([_ep("a", source="config", weight=2)])
    assert not registry.register(_ep("a", weight=7))
    (endpoint,) = registry.snapshot()
    assert endpoint.weight == 7
    assert endpoint.source == "registry"


def test_deregister_unknown_is_not_found():
    with pytest.raises(NotFound, match="'ghost'"):
        Registry().deregister("ghost")


def test_register_validates_every_field():
    with pytest.raises(InvalidArgument) as err:
        Registry().register(Endpoint(id="", address="", model=""))
    assert {v.field for v in err.value.violations} == {"id", "address", "model"}


@pytest.mark.parametrize(
    ("endpoint", "field"),
    [
        (_ep("a b"), "id"),
        (_ep("x" * 200), "id"),
        (_ep("a", address="host"), "address"),
        (_ep("a", address="host:0"), "address"),
        (_ep("a", address="host:99999"), "address"),
        (_ep("a", address=":80"), "address"),
        (_ep("a", health_url="localhost/health"), "health_url"),
        (_ep("a", weight=0), "weight"),
        (_ep("a", cost_per_1k_tokens=float("nan")), "cost_per_1k_tokens"),
        (_ep("a", capabilities=frozenset(str(i) for i in range(200))), "capabilities"),
    ],
)
def test_check_endpoint_names_the_bad_field(endpoint, field):
    assert [v.field for v in check_endpoint(endpoint)] == [field]


def test_store_round_trips_every_field_and_survives_reopen(tmp_path):
    endpoint = _ep(
        "a",
        health_url="http://h/health",
        weight=4,
        capabilities=frozenset({"tools", "vision"}),
        cost_per_1k_tokens=0.25,
        labels={"zone": "x"},
        metrics_url="http://h/metrics",
        metrics_kind=MetricsKind.SGLANG,
        probe_headers={"k": "v"},
        max_in_flight=3,
        requests_per_minute=60,
        tokens_per_minute=1000,
    )
    registry = Registry(store=EndpointStore(tmp_path))
    registry.register(endpoint)
    registry.register(_ep("b"))
    registry.deregister("b")
    registry.close()

    reopened = Registry([_ep("c", source="config")], store=EndpointStore(tmp_path))
    assert [e.id for e in reopened.snapshot()] == ["a", "c"]
    assert reopened.get("a") == Endpoint(**{**_fields(endpoint), "source": "registry"})
    reopened.close()


def test_rejected_register_writes_nothing(tmp_path):
    registry = Registry(store=EndpointStore(tmp_path))
    with pytest.raises(InvalidArgument):
        registry.register(_ep("", address=""))
    registry.close()
    assert Registry(store=EndpointStore(tmp_path)).snapshot() == ()


def _fields(endpoint: Endpoint) -> dict:
    return {name: getattr(endpoint, name) for name in Endpoint.__dataclass_fields__}


def test_probe_reports_expire_once_and_name_the_prober():
    reports = ProbeReports()
    reports.record("a", prober_id="probe-a", valid_for_s=15, now=100)
    reports.record("b", prober_id="probe-a", valid_for_s=0, now=100)
    reports.record("c", prober_id="probe-b", valid_for_s=15, now=100)
    assert reports.expire(now=114.9) == []
    reports.record("c", prober_id="probe-b", valid_for_s=15, now=110)
    (stale,) = reports.expire(now=116)
    assert stale.endpoint_id == "a"
    assert stale.reason == "probe-a: results stale (no report for 16 s)"
    assert reports.expire(now=116) == []
    reports.retain({"a", "b"})
    assert reports.expire(now=1000) == []
