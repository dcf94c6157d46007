"""Which endpoints the prefix-cache producers credit a routed request to."""

from __future__ import annotations

from types import MappingProxyType

from epp.datastore import Datastore, Endpoint, EndpointMetrics, EndpointView
from epp.scheduling.plugins._util import routed_endpoints, served_elsewhere
from epp.scheduling.types import ProfileRunResult, SchedulingResult


def _ep(key: str) -> Endpoint:
    """``key`` is the endpoint's ``address:port`` key."""
    address, port = key.split(":")
    return Endpoint(address, address, int(port), labels=MappingProxyType({}))


def _view(key: str) -> EndpointView:
    return EndpointView(_ep(key), EndpointMetrics(updated_at=1.0), False)


def _result(decode: str, prefill: str | None) -> SchedulingResult:
    profiles: dict[str, ProfileRunResult | None] = {"decode": ProfileRunResult([_view(decode)])}
    profiles["prefill"] = None if prefill is None else ProfileRunResult([_view(prefill)])
    return SchedulingResult(profiles, "decode")


def _store(*keys: str) -> Datastore:
    ds = Datastore(clock=lambda: 1.0)
    ds.replace_endpoints([_ep(k) for k in keys])
    return ds


def test_primary_then_prefill_without_repeats() -> None:
    assert list(routed_endpoints(_result("d:1", "p:1"), None)) == ["d:1", "p:1"]
    assert list(routed_endpoints(_result("d:1", "d:1"), None)) == ["d:1"]
    assert list(routed_endpoints(_result("d:1", None), None)) == ["d:1"]


def test_only_current_pool_members_are_credited() -> None:
    ds = _store("d:1")
    assert list(routed_endpoints(_result("d:1", "gone:1"), ds)) == ["d:1"]
    assert list(routed_endpoints(_result("gone:1", "d:1"), ds)) == ["d:1"]


def test_served_elsewhere_needs_a_successful_fallback_to_a_member() -> None:
    ds = _store("d:1", "other:1")
    r = _result("d:1", None)
    assert served_elsewhere(r, "other:1", 200, ds) == "other:1"
    assert served_elsewhere(r, "other:1", None, ds) == "other:1"
    assert served_elsewhere(r, "d:1", 200, ds) is None
    assert served_elsewhere(r, None, 200, ds) is None
    assert served_elsewhere(r, "other:1", 503, ds) is None
    assert served_elsewhere(r, "gone:1", 200, ds) is None
    assert served_elsewhere(r, "gone:1", 200, None) == "gone:1"
