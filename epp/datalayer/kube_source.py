"""Kubernetes endpoint source: an InferencePool (or a standalone selector) via the API.

:class:`KubeEndpointSource` runs a :class:`pdroute.kube.PoolWatcher` and, when leader
election is on, a :class:`pdroute.kube.LeaderElector`. Every changed set of
(ready pod x target port) becomes one ``Datastore.replace_endpoints`` call with
``Endpoint(name=f"{pod}-rank-{i}", address=podIP, port=port, labels=pod labels)``.

Readiness (``ready()``): the pods for the pool were listed at least once and, with
leader election on, this replica holds the lease. Followers keep watching (hot
standby) so a failover routes with a current set at once. During an API server
outage the last known set stays in the datastore and readiness does not change;
with leader election the leader keeps leading through the outage unless
``--ha-step-down-when-unreachable`` asks for strict client-go semantics (see
:mod:`pdroute.kube.leader` for the trade-off).

CLI wiring (``epp.cmd`` calls these; the flag names follow the reference EPP):
:func:`add_kube_arguments` and :func:`build_kube_source`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import socket
from types import MappingProxyType

from epp.datastore import Datastore, Endpoint
from pdroute.kube import (
    ElectionConfig,
    InvalidPool,
    KubeClient,
    KubeConfigError,
    KubeLeaseStore,
    LeaderElector,
    PoolEndpoint,
    PoolTarget,
    PoolWatcher,
    parse_ports,
    parse_selector,
)
from pdroute.kube.cli import add_connection_arguments, kube_config_from_args

ENGINE_LABEL = "inference.networking.k8s.io/engine-type"


def to_endpoint(ep: PoolEndpoint) -> Endpoint:
    return Endpoint(
        name=ep.name,
        address=ep.address,
        port=ep.port,
        labels=MappingProxyType(dict(ep.labels)),
        engine=ep.labels.get(ENGINE_LABEL),
    )


class KubeEndpointSource:
    """An :class:`epp.datalayer.source.EndpointSource` fed by the Kubernetes API."""

    def __init__(
        self,
        client: KubeClient,
        namespace: str,
        *,
        pool_name: str | None = None,
        standalone: PoolTarget | None = None,
        elector: LeaderElector | None = None,
        close_client: bool = True,
    ) -> None:
        self.client = client
        self.watcher = PoolWatcher(client, namespace, pool_name=pool_name, standalone=standalone)
        self.elector = elector
        self._close_client = close_client
        self._datastore: Datastore | None = None
        self.watcher.subscribe(self._deliver)

    def _deliver(self, endpoints: tuple[PoolEndpoint, ...]) -> None:
        if self._datastore is not None:
            self._datastore.replace_endpoints(to_endpoint(e) for e in endpoints)

    def ready(self) -> bool:
        if not self.watcher.synced:
            return False
        return self.elector is None or self.elector.is_leader

    async def run(self, datastore: Datastore) -> None:
        self._datastore = datastore
        tasks: list[asyncio.Task[None]] = []
        try:
            if self.elector is not None:
                tasks.append(asyncio.create_task(self.elector.run()))
            tasks.append(asyncio.create_task(self.watcher.run()))
            # Whichever ends first (only by an error) ends the source.
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                t.result()
        finally:
            for t in tasks:
                t.cancel()
            for t in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await t
            if self._close_client:
                await self.client.close()


def add_kube_arguments(parser: argparse.ArgumentParser) -> None:
    """The Kubernetes flags of ``pdroute epp`` (an argument group)."""
    g = parser.add_argument_group("Kubernetes endpoint discovery")
    g.add_argument("--pool-name", help="InferencePool to serve (inference.networking.k8s.io/v1)")
    g.add_argument(
        "--pool-namespace",
        default=None,
        help="namespace of the pool and its pods (default: $NAMESPACE, the service "
        "account's namespace, else 'default')",
    )
    g.add_argument(
        "--endpoint-selector",
        help="standalone mode, no InferencePool: pod label selector 'k=v,k2=v2'",
    )
    g.add_argument(
        "--endpoint-target-ports",
        help="standalone mode: comma-separated ports, one endpoint per port (1-8)",
    )
    add_connection_arguments(g)
    g.add_argument(
        "--ha-enable-leader-election",
        action="store_true",
        help="active-passive HA: only the Lease holder reports ready",
    )
    g.add_argument("--ha-lease-name", help="Lease name (default: epp-<namespace>-<pool>)")
    g.add_argument(
        "--ha-identity", help="this replica's identity in the Lease (default: $POD_NAME/hostname)"
    )
    g.add_argument(
        "--ha-step-down-when-unreachable",
        action="store_true",
        help="strict client-go semantics: the leader turns unready when it cannot renew for "
        "--ha-renew-deadline even if the API server is merely down (default: keep leading "
        "through an API server outage)",
    )
    g.add_argument("--ha-lease-duration", type=float, default=15.0, metavar="SECONDS")
    g.add_argument("--ha-renew-deadline", type=float, default=10.0, metavar="SECONDS")
    g.add_argument("--ha-retry-period", type=float, default=2.0, metavar="SECONDS")


def build_kube_source(args: argparse.Namespace) -> KubeEndpointSource | None:
    """The source the flags ask for, or None when neither ``--pool-name`` nor
    ``--endpoint-selector`` is given. Raises :class:`KubeConfigError` (a ValueError
    naming the flag) on bad flags."""
    pool_name = getattr(args, "pool_name", None)
    selector = getattr(args, "endpoint_selector", None)
    ports = getattr(args, "endpoint_target_ports", None)
    if not pool_name and not selector and not ports:
        return None
    if pool_name and (selector or ports):
        raise KubeConfigError(
            "--pool-name and --endpoint-selector/--endpoint-target-ports are mutually exclusive"
        )
    standalone: PoolTarget | None = None
    if not pool_name:
        if not selector or not ports:
            raise KubeConfigError(
                "standalone mode needs both --endpoint-selector and --endpoint-target-ports"
            )
        try:
            standalone = PoolTarget(parse_selector(selector), parse_ports(ports))
        except InvalidPool as e:
            raise KubeConfigError(f"--endpoint-selector/--endpoint-target-ports: {e}") from e
    namespace = getattr(args, "pool_namespace", None) or os.environ.get("NAMESPACE")
    cfg = kube_config_from_args(args, namespace)
    ns = cfg.namespace
    client = KubeClient(cfg)
    elector: LeaderElector | None = None
    if getattr(args, "ha_enable_leader_election", False):
        try:
            econf = ElectionConfig(
                lease_duration_s=args.ha_lease_duration,
                renew_deadline_s=args.ha_renew_deadline,
                retry_period_s=args.ha_retry_period,
                keep_leading_while_unreachable=not getattr(
                    args, "ha_step_down_when_unreachable", False
                ),
            )
        except ValueError as e:
            raise KubeConfigError(
                f"--ha-lease-duration/--ha-renew-deadline/--ha-retry-period: {e}"
            ) from e
        lease_name = getattr(args, "ha_lease_name", None) or (
            f"epp-{ns}-{pool_name or 'standalone'}"
        )
        identity = (
            getattr(args, "ha_identity", None)
            or os.environ.get("POD_NAME")
            or f"{socket.gethostname()}-{os.getpid()}"
        )
        elector = LeaderElector(KubeLeaseStore(client, ns, lease_name), identity, econf)
    return KubeEndpointSource(
        client, ns, pool_name=pool_name or None, standalone=standalone, elector=elector
    )
