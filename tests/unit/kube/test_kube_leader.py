"""Lease leader election in virtual time: an in-memory Lease store (with the API
server's optimistic-concurrency rule) stands in for the apiserver; the real thing is
exercised in tests/integration/kube/test_kube_leader_election.py."""

from __future__ import annotations

import msgspec
import pytest

from pdroute.kube.client import KubeUnavailable
from pdroute.kube.leader import ElectionConfig, LeaderElector, LeaseConflict
from pdroute.kube.types import Lease


class FakeLeaseStore:
    """One Lease with resourceVersion checks (409 on a stale write), like the apiserver."""

    def __init__(self) -> None:
        self.lease: Lease | None = None
        self.rv = 0
        self.down = False
        self.name = "l"

    def _check(self) -> None:
        if self.down:
            raise KubeUnavailable("down")

    async def get(self) -> Lease | None:
        self._check()
        return self.lease

    async def create(self, lease: Lease) -> Lease:
        self._check()
        if self.lease is not None:
            raise LeaseConflict("exists")
        return self._store(lease)

    async def update(self, lease: Lease) -> Lease:
        self._check()
        assert self.lease is not None
        if lease.metadata.resource_version != self.lease.metadata.resource_version:
            raise LeaseConflict("stale")
        return self._store(lease)

    def _store(self, lease: Lease) -> Lease:
        self.rv += 1
        meta = msgspec.structs.replace(lease.metadata, resource_version=str(self.rv))
        self.lease = msgspec.structs.replace(lease, metadata=meta)
        return self.lease


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


CFG = ElectionConfig(lease_duration_s=15, renew_deadline_s=10, retry_period_s=2)


def electors(store: FakeLeaseStore, clock: Clock, n: int) -> list[LeaderElector]:
    return [
        LeaderElector(store, f"e{i}", CFG, clock=clock, wall_clock=lambda: 1.7e9) for i in range(n)
    ]


async def step(es: list[LeaderElector], clock: Clock, dt: float = 2.0) -> None:
    for e in es:
        await e.tick()
    clock.t += dt


async def test_exactly_one_leader_and_failover_within_lease_duration() -> None:
    store, clock = FakeLeaseStore(), Clock()
    es = electors(store, clock, 3)
    for _ in range(5):
        await step(es, clock)
        assert sum(e.is_leader for e in es) == 1
    assert es[0].is_leader  # first to try wins
    assert store.lease is not None and store.lease.spec.holder_identity == "e0"
    # e0 dies silently at time t0 (last renewal happened at t0 - 2).
    dead_at = clock.t - 2.0
    alive = es[1:]
    took_over_at = None
    for _ in range(20):
        await step(alive, clock)
        if any(e.is_leader for e in alive):
            took_over_at = clock.t - 2.0
            break
    assert took_over_at is not None
    assert sum(e.is_leader for e in alive) == 1
    # Bound: lease_duration + retry_period after the last renewal.
    assert took_over_at - dead_at <= CFG.lease_duration_s + CFG.retry_period_s
    # And not before the lease expired.
    assert took_over_at - dead_at >= CFG.lease_duration_s - CFG.retry_period_s
    assert store.lease is not None and store.lease.spec.lease_transitions == 1


async def test_release_hands_over_at_next_retry() -> None:
    store, clock = FakeLeaseStore(), Clock()
    es = electors(store, clock, 2)
    await step(es, clock)
    assert es[0].is_leader
    await es[0].release()
    assert not es[0].is_leader
    assert store.lease is not None and store.lease.spec.holder_identity == ""
    await step(es[1:], clock)
    assert es[1].is_leader


async def test_leader_steps_down_after_renew_deadline_when_apiserver_unreachable() -> None:
    store, clock = FakeLeaseStore(), Clock()
    (e,) = electors(store, clock, 1)
    await step([e], clock)
    assert e.is_leader
    store.down = True
    lost_at = None
    for _ in range(10):
        await step([e], clock)
        if not e.is_leader:
            lost_at = clock.t - 2.0
            break
    assert lost_at is not None
    # Stepped down after renew_deadline, strictly before the lease could expire for others.
    assert CFG.renew_deadline_s <= lost_at - 1000.0 < CFG.lease_duration_s
    store.down = False
    await step([e], clock)
    assert e.is_leader  # the record still names it: it re-acquires


async def test_conflicting_writers_cannot_both_win() -> None:
    store, clock = FakeLeaseStore(), Clock()
    a, b = electors(store, clock, 2)
    await a.tick()
    # Make the lease look expired to b, then let a renew between b's read and write.
    clock.t += 100
    real_update = store.update

    async def racing_update(lease: Lease) -> Lease:
        if lease.spec.holder_identity == "e1":
            store.update = real_update  # type: ignore[method-assign]
            await a.tick()  # a renews first
        return await real_update(lease)

    store.update = racing_update  # type: ignore[method-assign]
    await b.tick()
    assert a.is_leader and not b.is_leader
    assert store.lease is not None and store.lease.spec.holder_identity == "e0"


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="lease_duration > renew_deadline"):
        ElectionConfig(lease_duration_s=5, renew_deadline_s=5, retry_period_s=1)


async def test_keep_leading_while_unreachable_but_step_down_when_someone_else_holds() -> None:
    store, clock = FakeLeaseStore(), Clock()
    cfg = ElectionConfig(15, 10, 2, keep_leading_while_unreachable=True)
    a = LeaderElector(store, "a", cfg, clock=clock, wall_clock=lambda: 1.7e9)
    b = LeaderElector(store, "b", cfg, clock=clock, wall_clock=lambda: 1.7e9)
    await step([a, b], clock)
    assert a.is_leader and not b.is_leader
    store.down = True  # the API server is down for everyone
    for _ in range(30):  # 60 s, far past renew deadline and lease duration
        await step([a, b], clock)
        assert a.is_leader and not b.is_leader
    store.down = False
    await step([a, b], clock)
    assert a.is_leader and not b.is_leader  # a renews at once; b saw a fresh record
    # Partition: only a is cut off; b takes over after lease_duration, a then steps down.
    real_get = store.get

    async def a_cut_off() -> Lease | None:
        raise KubeUnavailable("partitioned")

    for _ in range(10):
        store.get = a_cut_off  # type: ignore[method-assign]
        await a.tick()
        store.get = real_get  # type: ignore[method-assign]
        await b.tick()
        clock.t += 2.0
    assert b.is_leader and a.is_leader  # the documented two-leader window
    await a.tick()  # a reaches the API server again and sees b's fresh lease
    assert not a.is_leader and b.is_leader
