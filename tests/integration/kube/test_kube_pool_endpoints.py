"""The EPP's Kubernetes endpoint source against a real kube-apiserver.

Pods are plain API objects (no kubelet): the test writes their IP and Ready condition
through the status subresource, exactly as a kubelet would.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest
from kube_helpers import Admin, KubeCluster, client_for, keys, wait_for

from epp.datalayer.kube_source import KubeEndpointSource
from epp.datastore import Datastore
from pdroute.kube import (
    ElectionConfig,
    KubeClient,
    KubeConfig,
    KubeLeaseStore,
    LeaderElector,
    PoolMembers,
    PoolTarget,
)

pytestmark = pytest.mark.kube


@contextlib.asynccontextmanager
async def running(source: KubeEndpointSource, ds: Datastore) -> AsyncIterator[None]:
    task = asyncio.create_task(source.run(ds))
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_pods_appear_turn_unready_and_disappear(
    kube_cluster: KubeCluster, admin: Admin
) -> None:
    ns = await admin.namespace()
    await admin.create_pool(ns, "pool", {"app": "m"}, [8000, 8001])
    await admin.create_pod(ns, "a", {"app": "m", "llm-d.ai/role": "decode"}, ip="10.0.0.1")
    await admin.create_pod(ns, "b", {"app": "m"}, ip="10.0.0.2", ready=False)
    await admin.create_pod(ns, "other", {"app": "x"}, ip="10.0.0.9")
    await admin.create_pod(ns, "noip", {"app": "m"})  # pending: no IP yet

    ds = Datastore()
    src = KubeEndpointSource(client_for(kube_cluster), ns, pool_name="pool")
    async with running(src, ds):
        await wait_for(src.ready, "source ready")
        await wait_for(lambda: keys(ds) == {"10.0.0.1:8000", "10.0.0.1:8001"}, "pod a only")
        a0 = ds.get("10.0.0.1:8000")
        assert a0 is not None and a0.name == "a-rank-0" and a0.role == "decode"
        assert ds.get("10.0.0.1:8001").name == "a-rank-1"  # type: ignore[union-attr]

        await admin.set_pod_status(ns, "b", ip="10.0.0.2", ready=True)
        await wait_for(lambda: len(keys(ds)) == 4, "b turned ready")

        await admin.set_pod_status(ns, "noip", ip="10.0.0.3", ready=True)
        await wait_for(lambda: "10.0.0.3:8000" in keys(ds), "pending pod got an IP")

        await admin.set_pod_status(ns, "a", ip="10.0.0.1", ready=False)
        await wait_for(
            lambda: (
                keys(ds) == {"10.0.0.2:8000", "10.0.0.2:8001", "10.0.0.3:8000", "10.0.0.3:8001"}
            ),
            "a unready",
        )

        # Narrow b to one port with the active-ports annotation.
        await admin.patch_pod(
            ns,
            "b",
            {"metadata": {"annotations": {"inference.networking.k8s.io/active-ports": "8001"}}},
        )
        await wait_for(lambda: "10.0.0.2:8000" not in keys(ds), "active-ports narrowing")
        assert "10.0.0.2:8001" in keys(ds)

        # Relabel b out of the pool.
        await admin.patch_pod(ns, "b", {"metadata": {"labels": {"app": "gone"}}})
        await wait_for(lambda: keys(ds) == {"10.0.0.3:8000", "10.0.0.3:8001"}, "b relabelled")

        # A terminating pod (deletionTimestamp set, held by a finalizer) is not routable.
        await admin.patch_pod(ns, "noip", {"metadata": {"finalizers": ["pdroute.test/hold"]}})
        await admin.delete_pod(ns, "noip", grace=30)
        await wait_for(lambda: keys(ds) == set(), "terminating pod removed")
        await admin.patch_pod(ns, "noip", {"metadata": {"finalizers": None}})

        await admin.delete_pod(ns, "a")
        await admin.create_pod(ns, "c", {"app": "m"}, ip="10.0.0.4")
        await wait_for(lambda: keys(ds) == {"10.0.0.4:8000", "10.0.0.4:8001"}, "c added")
        assert src.ready()


async def test_pool_selector_and_ports_change_resync(
    kube_cluster: KubeCluster, admin: Admin
) -> None:
    ns = await admin.namespace()
    await admin.create_pod(ns, "m1", {"app": "m"}, ip="10.1.0.1")
    await admin.create_pod(ns, "n1", {"app": "n"}, ip="10.1.0.2")
    ds = Datastore()
    src = KubeEndpointSource(client_for(kube_cluster), ns, pool_name="pool")
    async with running(src, ds):
        await asyncio.sleep(0.5)
        assert not src.ready(), "ready without a pool"
        await admin.create_pool(ns, "pool", {"app": "m"}, [8000])
        await wait_for(lambda: keys(ds) == {"10.1.0.1:8000"}, "initial pool")
        assert src.ready()

        await admin.patch_pool(ns, "pool", {"selector": {"matchLabels": {"app": "n"}}})
        await wait_for(lambda: keys(ds) == {"10.1.0.2:8000"}, "selector change")

        await admin.patch_pool(ns, "pool", {"targetPorts": [{"number": 9000}, {"number": 9001}]})
        await wait_for(lambda: keys(ds) == {"10.1.0.2:9000", "10.1.0.2:9001"}, "ports change")
        assert ds.get("10.1.0.2:9001").name == "n1-rank-1"  # type: ignore[union-attr]

        # Pods of the new selector keep being watched.
        await admin.create_pod(ns, "n2", {"app": "n"}, ip="10.1.0.3")
        await wait_for(lambda: len(keys(ds)) == 4, "new pod under new selector")

        await admin.delete_pool(ns, "pool")
        await wait_for(lambda: not src.ready() and keys(ds) == set(), "pool deleted")
        await admin.create_pool(ns, "pool", {"app": "m"}, [8000])
        await wait_for(lambda: src.ready() and keys(ds) == {"10.1.0.1:8000"}, "pool recreated")


async def test_standalone_pool_members(kube_cluster: KubeCluster, admin: Admin) -> None:
    ns = await admin.namespace()
    await admin.create_pod(ns, "p", {"app": "m", "llm-d.ai/role": "prefill"}, ip="10.2.0.1")
    async with client_for(kube_cluster) as client:
        members = PoolMembers(client, ns, selector={"app": "m"}, target_ports=[8000])
        assert not members.allows("10.2.0.1:8000")  # fail closed before sync
        task = asyncio.create_task(members.run())
        try:
            await members.wait_synced(15)
            assert members.members() == frozenset({"10.2.0.1:8000"})
            assert members.allows("10.2.0.1:8000") and "10.2.0.1:8000" in members
            assert members.allows_address("10.2.0.1", 8000)
            assert not members.allows("10.2.0.1:8001")
            assert not members.allows_address("169.254.169.254", 80)
            await admin.set_pod_status(ns, "p", ip="10.2.0.1", ready=False)
            await wait_for(lambda: not members.allows("10.2.0.1:8000"), "unready pod removed")
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def test_standalone_mode_needs_no_crd_objects(
    kube_cluster: KubeCluster, admin: Admin
) -> None:
    ns = await admin.namespace()
    await admin.create_pod(ns, "s", {"app": "s"}, ip="10.3.0.1")
    ds = Datastore()
    src = KubeEndpointSource(
        client_for(kube_cluster), ns, standalone=PoolTarget({"app": "s"}, (8000, 8002))
    )
    async with running(src, ds):
        await wait_for(lambda: keys(ds) == {"10.3.0.1:8000", "10.3.0.1:8002"}, "standalone set")
        assert src.ready()


#: The least privilege the EPP needs (the Helm chart's Role must grant at least this).
EPP_RULES = [
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]},
    {
        "apiGroups": ["inference.networking.k8s.io"],
        "resources": ["inferencepools"],
        "verbs": ["get", "list", "watch"],
    },
    {
        "apiGroups": ["coordination.k8s.io"],
        "resources": ["leases"],
        "verbs": ["get", "create", "update"],
    },
]


async def test_epp_works_with_least_privilege_rbac_and_not_without(
    kube_cluster: KubeCluster, admin: Admin
) -> None:
    ns = await admin.namespace()
    await admin.create_pool(ns, "pool", {"app": "m"}, [8000])
    await admin.create_pod(ns, "a", {"app": "m"}, ip="10.4.0.1")
    cfg = KubeConfig(
        server=kube_cluster.url,
        token_file=kube_cluster.epp_token_file,
        ca_file=kube_cluster.ca_file,
    )
    elector_cfg = ElectionConfig(lease_duration_s=3, renew_deadline_s=2, retry_period_s=0.5)

    def source() -> KubeEndpointSource:
        client = KubeClient(cfg)
        elector = LeaderElector(KubeLeaseStore(client, ns, "epp-pool"), "epp-0", elector_cfg)
        return KubeEndpointSource(client, ns, pool_name="pool", elector=elector)

    ds = Datastore()
    src = source()
    async with running(src, ds):
        await asyncio.sleep(1.5)
        assert not src.ready() and not ds.synced  # 403 everywhere
        assert src.elector is not None and not src.elector.is_leader

    await admin.call(
        "POST",
        f"/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/roles",
        {"metadata": {"name": "epp"}, "rules": EPP_RULES},
    )
    await admin.call(
        "POST",
        f"/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/rolebindings",
        {
            "metadata": {"name": "epp"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "epp"},
            "subjects": [{"kind": "User", "name": "epp", "apiGroup": "rbac.authorization.k8s.io"}],
        },
    )
    ds = Datastore()
    src = source()
    async with running(src, ds):
        await wait_for(lambda: src.ready() and keys(ds) == {"10.4.0.1:8000"}, "ready with RBAC", 30)
