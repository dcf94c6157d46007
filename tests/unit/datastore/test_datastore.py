"""Datastore: the cached snapshot always equals a fresh evaluation of the pool."""

from __future__ import annotations

import random

from epp.datastore import Datastore, Endpoint, EndpointMetrics, EndpointView

STALENESS = 2.0


def _naive(ds: Datastore, now: float) -> list[tuple[str, EndpointMetrics, bool]]:
    """What the snapshot must say at ``now``, evaluated from scratch."""
    out = []
    for ep in ds.endpoints():
        m = ds.metrics(ep.key) or EndpointMetrics()
        stale = m.updated_at == 0.0 or now - m.updated_at > STALENESS
        out.append((ep.key, m, stale))
    return out


def _seen(views: tuple[EndpointView, ...]) -> list[tuple[str, EndpointMetrics, bool]]:
    return [(v.key, v.metrics, v.stale) for v in views]


def test_snapshot_matches_fresh_evaluation_under_random_operations() -> None:
    rng = random.Random(7)
    now = [100.0]
    ds = Datastore(clock=lambda: now[0], staleness_s=STALENESS)
    pool = [Endpoint(f"e{i}", f"10.0.0.{i}", 8000) for i in range(8)]
    ds.replace_endpoints(pool[:5])
    for step in range(3000):
        op = rng.random()
        if op < 0.35:
            now[0] += rng.choice([0.0, 0.001, 0.5, 1.0, 1.999, 2.0, 2.5])
        elif op < 0.37:
            now[0] -= 1.0  # an injected clock may go back; the answer must still be exact
        elif op < 0.75:
            ep = rng.choice(pool)  # sometimes not a member: ignored
            age = rng.choice([0.0, 0.5, 1.9, 2.0, 3.0])
            updated = 0.0 if rng.random() < 0.1 else now[0] - age
            ds.update_metrics(ep.key, EndpointMetrics(waiting=step, updated_at=updated))
        elif op < 0.8:
            ds.replace_endpoints(rng.sample(pool, rng.randint(0, len(pool))))
        snap = ds.snapshot()
        assert _seen(snap.endpoints) == _naive(ds, now[0]), step


def test_snapshot_is_reused_until_something_changes() -> None:
    now = [10.0]
    ds = Datastore(clock=lambda: now[0], staleness_s=STALENESS)
    a, b = Endpoint("a", "10.0.0.1", 8000), Endpoint("b", "10.0.0.2", 8000)
    ds.replace_endpoints([a, b])
    ds.update_metrics(a.key, EndpointMetrics(updated_at=10.0))
    ds.update_metrics(b.key, EndpointMetrics(updated_at=9.0))
    s1 = ds.snapshot()
    now[0] = 11.0
    assert ds.snapshot() is s1  # nothing aged out: the same object
    now[0] = 11.5  # b is 2.5 s old now
    s2 = ds.snapshot()
    assert s2 is not s1 and [v.stale for v in s2.endpoints] == [False, True]
    ds.update_metrics(b.key, EndpointMetrics(updated_at=11.5))
    s3 = ds.snapshot()
    assert [v.stale for v in s3.endpoints] == [False, False]
    assert s3.endpoints[0] is s2.endpoints[0]  # only the updated endpoint's view is new


def test_endpoint_key_is_derived_and_not_part_of_equality() -> None:
    e = Endpoint("x", "fd00::1", 8000)
    assert e.key == "[fd00::1]:8000"
    assert Endpoint("x", "10.0.0.1", 80).key == "10.0.0.1:80"
    assert Endpoint("x", "[fd00::1]", 80).key == "[fd00::1]:80"
    assert e == Endpoint("x", "fd00::1", 8000)
    view = EndpointView(e, EndpointMetrics(), True)
    assert view.key == e.key
