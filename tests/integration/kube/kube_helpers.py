"""Test-side helpers for the kube tier: the control plane handle and an admin client.

``Admin`` is an independent aiohttp client with the admin token, used to create
namespaces, pods (status written through the status subresource, since there is no
kubelet) and InferencePools; it does not use the code under test.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import orjson

from epp.datastore import Datastore
from pdroute.kube import KubeClient, KubeConfig
from tests.kubeapi import SCRIPT, KubeCluster

__all__ = ["SCRIPT", "Admin", "KubeCluster", "admin_client", "client_for", "keys", "wait_for"]


class Admin:
    """Test-side writes with the admin token (plain aiohttp + orjson)."""

    def __init__(self, cluster: KubeCluster, session: aiohttp.ClientSession) -> None:
        self.cluster = cluster
        self._s = session
        self._h = {"Authorization": f"Bearer {cluster.token}"}

    async def call(
        self, method: str, path: str, body: Any = None, content_type: str = "application/json"
    ) -> Any:
        headers = dict(self._h)
        data = None
        if body is not None:
            data = orjson.dumps(body)
            headers["Content-Type"] = content_type
        async with self._s.request(
            method, self.cluster.url + path, data=data, headers=headers
        ) as resp:
            raw = await resp.read()
            if resp.status >= 300:
                raise AssertionError(f"{method} {path}: HTTP {resp.status}: {raw[:500]!r}")
            return orjson.loads(raw) if raw else None

    async def namespace(self) -> str:
        name = f"t-{secrets.token_hex(4)}"
        await self.call(
            "POST",
            "/api/v1/namespaces",
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}},
        )
        return name

    async def create_pod(
        self,
        ns: str,
        name: str,
        labels: dict[str, str],
        *,
        ip: str | None = None,
        ready: bool = True,
        annotations: dict[str, str] | None = None,
    ) -> None:
        body = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "labels": labels, "annotations": annotations or {}},
            "spec": {"containers": [{"name": "vllm", "image": "example.invalid/vllm:0"}]},
        }
        await self.call("POST", f"/api/v1/namespaces/{ns}/pods", body)
        if ip is not None:
            await self.set_pod_status(ns, name, ip=ip, ready=ready)

    async def set_pod_status(self, ns: str, name: str, *, ip: str, ready: bool) -> None:
        status = {
            "status": {
                "phase": "Running",
                "podIP": ip,
                "podIPs": [{"ip": ip}],
                "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
            }
        }
        await self.call(
            "PATCH",
            f"/api/v1/namespaces/{ns}/pods/{name}/status",
            status,
            "application/merge-patch+json",
        )

    async def patch_pod(self, ns: str, name: str, patch: dict[str, Any]) -> None:
        await self.call(
            "PATCH", f"/api/v1/namespaces/{ns}/pods/{name}", patch, "application/merge-patch+json"
        )

    async def delete_pod(self, ns: str, name: str, *, grace: int = 0) -> None:
        await self.call(
            "DELETE",
            f"/api/v1/namespaces/{ns}/pods/{name}",
            {"apiVersion": "v1", "kind": "DeleteOptions", "gracePeriodSeconds": grace},
        )

    def _pools(self, ns: str) -> str:
        return f"/apis/inference.networking.k8s.io/v1/namespaces/{ns}/inferencepools"

    async def create_pool(
        self, ns: str, name: str, selector: dict[str, str], ports: list[int]
    ) -> None:
        body = {
            "apiVersion": "inference.networking.k8s.io/v1",
            "kind": "InferencePool",
            "metadata": {"name": name},
            "spec": {
                "selector": {"matchLabels": selector},
                "targetPorts": [{"number": p} for p in ports],
                "endpointPickerRef": {"name": f"{name}-epp", "port": {"number": 9002}},
            },
        }
        await self.call("POST", self._pools(ns), body)

    async def patch_pool(self, ns: str, name: str, spec: dict[str, Any]) -> None:
        await self.call(
            "PATCH", f"{self._pools(ns)}/{name}", {"spec": spec}, "application/merge-patch+json"
        )

    async def delete_pool(self, ns: str, name: str) -> None:
        await self.call("DELETE", f"{self._pools(ns)}/{name}")


@contextlib.asynccontextmanager
async def admin_client(cluster: KubeCluster) -> AsyncIterator[Admin]:
    """An :class:`Admin` on its own session that trusts the cluster's CA."""
    conn = aiohttp.TCPConnector(ssl=cluster.ssl_context())
    async with aiohttp.ClientSession(connector=conn) as s:
        yield Admin(cluster, s)


def client_for(cluster: KubeCluster) -> KubeClient:
    return KubeClient(KubeConfig(server=cluster.url, token=cluster.token, ca_file=cluster.ca_file))


async def wait_for(pred: Callable[[], bool], what: str, within: float = 15.0) -> float:
    """Poll ``pred``; returns seconds waited. Fails with ``what`` on timeout."""
    start = time.monotonic()
    while not pred():
        if time.monotonic() - start > within:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(0.02)
    return time.monotonic() - start


def keys(ds: Datastore) -> set[str]:
    return {e.key for e in ds.endpoints()}
