"""PoolMembers: the live set of ``host:port`` an InferencePool currently resolves to.

Made for allowlists (the sidecar's SSRF guard: it may only forward a prefill leg to a
pool member). Membership = ready pods x target ports, exactly what the EPP routes to,
updated live from watches. Before the first sync nothing is a member (fail closed);
during an API server outage the last known set stays in force.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence

from pdroute.kube.client import KubeClient
from pdroute.kube.pool import PoolEndpoint, PoolTarget, PoolWatcher, host_port


class PoolMembers:
    """Live membership of one pool.

    Pool mode: ``PoolMembers(client, namespace, pool_name="p")``; standalone mode:
    ``PoolMembers(client, namespace, selector={"app": "x"}, target_ports=[8000])``.
    Run :meth:`run` as a task for the life of the process.
    """

    def __init__(
        self,
        client: KubeClient,
        namespace: str,
        *,
        pool_name: str | None = None,
        selector: Mapping[str, str] | None = None,
        target_ports: Sequence[int] | None = None,
    ) -> None:
        standalone = None
        if selector is not None or target_ports is not None:
            standalone = PoolTarget(dict(selector or {}), tuple(target_ports or ()))
        self.watcher = PoolWatcher(client, namespace, pool_name=pool_name, standalone=standalone)
        self._members: frozenset[str] = frozenset()
        self.watcher.subscribe(self._update)

    def _update(self, endpoints: tuple[PoolEndpoint, ...]) -> None:
        self._members = frozenset(e.host_port.lower() for e in endpoints)

    async def run(self) -> None:
        """Watch until cancelled."""
        await self.watcher.run()

    async def wait_synced(self, timeout_s: float | None = None) -> None:
        """Return once the first complete set is known; raises TimeoutError."""
        await asyncio.wait_for(self.watcher.wait_synced(), timeout_s)

    @property
    def synced(self) -> bool:
        return self.watcher.synced

    def members(self) -> frozenset[str]:
        """The current ``host:port`` set (IPv6 hosts bracketed)."""
        return self._members

    def allows(self, host_port: str) -> bool:
        """True when ``host_port`` (``ip:port``, IPv6 bracketed: ``[fd00::1]:8000``) is a
        ready pool member. Matches the sidecar's ``Allowlist`` protocol."""
        return host_port in self._members

    def allows_address(self, host: str, port: int) -> bool:
        """Like :meth:`allows` with the parts apart (IPv6 with or without brackets)."""
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        return host_port(host.lower(), port) in self._members

    def __contains__(self, hostport: object) -> bool:
        return isinstance(hostport, str) and hostport in self._members
