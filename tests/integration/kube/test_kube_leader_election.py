"""Lease leader election among 3 candidates against a real kube-apiserver.

Timings are short (lease 3 s, renew deadline 2 s, retry 0.5 s) so failover fits in a
test; the bound checked is the documented one (lease_duration + retry_period after
the last renewal) plus slack for a loaded machine. Measured numbers are printed.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

import pytest
from kube_helpers import Admin, KubeCluster, client_for, wait_for

from pdroute.kube import ElectionConfig, KubeClient, KubeLeaseStore, LeaderElector

pytestmark = pytest.mark.kube

CFG = ElectionConfig(lease_duration_s=3.0, renew_deadline_s=2.0, retry_period_s=0.5)
SLACK_S = 5.0


async def test_three_electors_one_leader_and_bounded_failover(
    kube_cluster: KubeCluster, admin: Admin, record_property: Callable[[str, object], None]
) -> None:
    ns = await admin.namespace()
    clients: list[KubeClient] = [client_for(kube_cluster) for _ in range(3)]
    electors = [
        LeaderElector(KubeLeaseStore(c, ns, "epp-lease"), f"epp-{i}", CFG)
        for i, c in enumerate(clients)
    ]
    tasks: dict[str, asyncio.Task[None]] = {
        # No release on cancel: cancelling a task is a crash; release() is called explicitly.
        e.identity: asyncio.create_task(e.run(release_on_cancel=False))
        for e in electors
    }
    try:
        await wait_for(lambda: sum(e.is_leader for e in electors) == 1, "a leader", 20)
        # Stable: exactly one leader over several renew periods.
        for _ in range(30):
            assert sum(e.is_leader for e in electors) == 1
            await asyncio.sleep(0.1)
        leader = next(e for e in electors if e.is_leader)
        lease = await admin.call(
            "GET", f"/apis/coordination.k8s.io/v1/namespaces/{ns}/leases/epp-lease"
        )
        assert lease["spec"]["holderIdentity"] == leader.identity

        # Crash the leader: stop its loop without releasing (no more renewals).
        crashed_at = time.monotonic()
        task = tasks.pop(leader.identity)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        others = [e for e in electors if e is not leader]
        failover_s = await wait_for(
            lambda: sum(e.is_leader for e in others) == 1,
            "failover",
            CFG.lease_duration_s + CFG.retry_period_s + SLACK_S,
        )
        failover_s = time.monotonic() - crashed_at
        new_leader = next(e for e in others if e.is_leader)
        # Never two leaders among the live ones.
        for _ in range(20):
            assert sum(e.is_leader for e in others) == 1
            await asyncio.sleep(0.1)

        # Orderly shutdown releases: the successor takes over within ~one retry period.
        released_at = time.monotonic()
        task = tasks.pop(new_leader.identity)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await new_leader.release()
        last = next(e for e in others if e is not new_leader)
        await wait_for(lambda: last.is_leader, "handover after release", 10)
        handover_s = time.monotonic() - released_at
        lease = await admin.call(
            "GET", f"/apis/coordination.k8s.io/v1/namespaces/{ns}/leases/epp-lease"
        )
        assert lease["spec"]["holderIdentity"] == last.identity
        assert lease["spec"]["leaseTransitions"] >= 2

        numbers = {
            "failover_after_crash_s": round(failover_s, 2),
            "bound_s": CFG.lease_duration_s + CFG.retry_period_s,
            "handover_after_release_s": round(handover_s, 2),
        }
        for k, v in numbers.items():
            record_property(k, v)
        print("\nKUBE-LEADER", numbers)
    finally:
        for t in tasks.values():
            t.cancel()
        for t in tasks.values():
            with contextlib.suppress(asyncio.CancelledError):
                await t
        for c in clients:
            await c.close()
