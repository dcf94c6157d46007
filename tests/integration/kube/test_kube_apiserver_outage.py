"""Watches across a kube-apiserver restart, and routing knowledge during an outage.

The apiserver *process* is stopped and started again on the same port (etcd keeps
the data, as in a control-plane upgrade). Measured numbers are printed (run with
``-s``) and attached as test properties; timings are never asserted, except a
generous "converges at all" deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterator

import pytest
from kube_helpers import Admin, KubeCluster, client_for, keys, wait_for

from epp.datalayer.kube_source import KubeEndpointSource
from epp.datastore import Datastore
from pdroute.kube import ElectionConfig, KubeLeaseStore, LeaderElector

pytestmark = pytest.mark.kube


@pytest.fixture(autouse=True)
def restore_apiserver(kube_cluster: KubeCluster) -> Iterator[None]:
    yield
    kube_cluster.ensure_apiserver()


async def test_watch_survives_apiserver_restart_without_loss_or_duplicates(
    kube_cluster: KubeCluster, admin: Admin, record_property: Callable[[str, object], None]
) -> None:
    ns = await admin.namespace()
    await admin.create_pool(ns, "pool", {"app": "m"}, [8000])
    for i in range(1, 6):
        await admin.create_pod(ns, f"p{i}", {"app": "m"}, ip=f"10.9.0.{i}")
    ds = Datastore()
    src = KubeEndpointSource(client_for(kube_cluster), ns, pool_name="pool")
    removed: list[str] = []
    ds.on_endpoint_removed(removed.append)
    task = asyncio.create_task(src.run(ds))
    try:
        want = {f"10.9.0.{i}:8000" for i in range(1, 6)}
        await wait_for(lambda: keys(ds) == want, "initial 5 pods")
        pods_inf = src.watcher._pod_informer
        assert pods_inf is not None
        lists_before = pods_inf.lists

        # --- outage: the EPP keeps routing with the last known set ---
        t0 = time.monotonic()
        await asyncio.to_thread(kube_cluster.stop_apiserver)
        stop_s = time.monotonic() - t0
        await wait_for(lambda: not src.watcher.connected, "watch noticed the outage", 30)
        outage_start = time.monotonic()
        samples = 0
        while time.monotonic() - outage_start < 3.0:
            assert keys(ds) == want, "endpoint set changed during the outage"
            assert src.ready(), "readiness dropped during the outage"
            samples += 1
            await asyncio.sleep(0.1)
        t1 = time.monotonic()
        await asyncio.to_thread(kube_cluster.start_apiserver)
        restart_s = time.monotonic() - t1
        outage_s = time.monotonic() - t0

        # Changes right after the restart land in the client's reconnect gap.
        t2 = time.monotonic()
        await admin.delete_pod(ns, "p1")
        await admin.set_pod_status(ns, "p2", ip="10.9.0.2", ready=False)
        await admin.create_pod(ns, "p6", {"app": "m"}, ip="10.9.0.6")
        await admin.set_pod_status(ns, "p3", ip="10.9.0.33", ready=True)  # IP change
        want2 = {"10.9.0.33:8000", "10.9.0.4:8000", "10.9.0.5:8000", "10.9.0.6:8000"}
        converge_s = await wait_for(lambda: keys(ds) == want2, "post-restart changes", 60)
        converge_s = time.monotonic() - t2
        reconnect_s = await wait_for(lambda: src.watcher.connected, "watch re-established", 30)

        # No duplicates or leftovers in the informer cache itself.
        pods_inf = src.watcher._pod_informer
        assert pods_inf is not None
        assert sorted(pods_inf.store) == sorted(f"{ns}/p{i}" for i in (2, 3, 4, 5, 6))
        assert len(ds.endpoints()) == 4
        assert sorted(removed) == ["10.9.0.1:8000", "10.9.0.2:8000", "10.9.0.3:8000"]
        relisted = pods_inf.lists - lists_before
        numbers = {
            "apiserver_stop_s": round(stop_s, 2),
            "apiserver_restart_to_ready_s": round(restart_s, 2),
            "outage_total_s": round(outage_s, 2),
            "outage_samples_with_full_set": samples,
            "changes_visible_after_s": round(converge_s, 2),
            "watch_connected_after_s": round(reconnect_s, 2),
            "relists_after_restart": relisted,
            "watch_errors": pods_inf.errors,
        }
        for k, v in numbers.items():
            record_property(k, v)
        print("\nKUBE-OUTAGE", numbers)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_source_started_during_outage_becomes_ready_when_apiserver_returns(
    kube_cluster: KubeCluster, admin: Admin
) -> None:
    ns = await admin.namespace()
    await admin.create_pool(ns, "pool", {"app": "m"}, [8000])
    await admin.create_pod(ns, "a", {"app": "m"}, ip="10.8.0.1")
    await asyncio.to_thread(kube_cluster.stop_apiserver)
    ds = Datastore()
    src = KubeEndpointSource(client_for(kube_cluster), ns, pool_name="pool")
    task = asyncio.create_task(src.run(ds))
    try:
        await asyncio.sleep(1.0)
        assert not src.ready() and not ds.synced
        await asyncio.to_thread(kube_cluster.start_apiserver)
        await wait_for(lambda: src.ready() and keys(ds) == {"10.8.0.1:8000"}, "ready", 60)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_leaders_during_an_outage_strict_versus_keep_leading(
    kube_cluster: KubeCluster, admin: Admin, record_property: Callable[[str, object], None]
) -> None:
    """Strict client-go semantics drop the leader (so every EPP replica turns unready)
    after renew_deadline; the EPP default keeps leading through the outage."""
    ns = await admin.namespace()
    renew_deadline_s = 2.0
    clients = [client_for(kube_cluster), client_for(kube_cluster)]
    flips: list[tuple[float, bool]] = []
    strict = LeaderElector(
        KubeLeaseStore(clients[0], ns, "strict"),
        "strict-0",
        ElectionConfig(3.0, renew_deadline_s, 0.5),
        on_change=lambda leading: flips.append((time.monotonic(), leading)),
    )
    keep = LeaderElector(
        KubeLeaseStore(clients[1], ns, "keep"),
        "keep-0",
        ElectionConfig(3.0, renew_deadline_s, 0.5, keep_leading_while_unreachable=True),
    )
    tasks = [asyncio.create_task(e.run(release_on_cancel=False)) for e in (strict, keep)]
    try:
        await wait_for(lambda: strict.is_leader and keep.is_leader, "both lead", 20)
        t_stop = time.monotonic()
        await asyncio.to_thread(kube_cluster.stop_apiserver)
        await wait_for(lambda: not strict.is_leader, "strict step-down", 30)
        strict_down_s = flips[-1][0] - t_stop
        await asyncio.sleep(max(0.0, 5.0 - (time.monotonic() - t_stop)))
        assert keep.is_leader, "keep-leading elector stepped down during the outage"
        t_start = time.monotonic()
        await asyncio.to_thread(kube_cluster.start_apiserver)
        await wait_for(lambda: strict.is_leader, "strict re-acquires", 30)
        back_s = flips[-1][0] - t_start
        assert keep.is_leader
        numbers = {
            "strict_step_down_after_s": round(strict_down_s, 2),
            "strict_renew_deadline_s": renew_deadline_s,
            "strict_leads_again_after_apiserver_start_s": round(back_s, 2),
        }
        for k, v in numbers.items():
            record_property(k, v)
        print("\nKUBE-HA-OUTAGE", numbers)
    finally:
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        for c in clients:
            await c.close()
