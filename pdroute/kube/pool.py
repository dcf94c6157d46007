"""InferencePool (inference.networking.k8s.io/v1) endpoint resolution.

An InferencePool selects pods by ``spec.selector.matchLabels`` in its own namespace and
names 1-8 ``targetPorts``; every (ready pod, port) pair is one endpoint (a data-parallel
rank), named ``<pod>-rank-<i>`` where ``i`` is the port's index in ``targetPorts``.
A pod is ready when it has an IP, no ``deletionTimestamp`` and condition Ready=True.
The pod annotation ``inference.networking.k8s.io/active-ports: "8000,8001"`` narrows
the ports of that pod.

:class:`PoolWatcher` keeps the resolved set current: one informer on the pool (field
selector ``metadata.name``), one on the pods matching the pool's selector. When the
pool's selector changes the pod informer is replaced (a new LIST with the new label
selector); when only the ports change the set is recomputed. *Standalone mode* takes
the selector and ports from flags and needs no CRD.

The functions at the top are pure (no I/O) and hold the resolution rules.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from pdroute.kube.client import KubeClient
from pdroute.kube.informer import Informer
from pdroute.kube.types import InferencePool, Pod

log = logging.getLogger(__name__)

POOL_GROUP = "inference.networking.k8s.io"
POOL_VERSION = "v1"
ACTIVE_PORTS_ANNOTATION = "inference.networking.k8s.io/active-ports"
MAX_TARGET_PORTS = 8
MAX_SELECTOR_LABELS = 64
_LABEL_KEY = re.compile(
    r"\A([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?\Z"
)
_LABEL_VALUE = re.compile(r"\A([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?\Z")


class InvalidPool(ValueError):
    """The pool spec (or the standalone flags) cannot be resolved; the message says why."""


@dataclass(frozen=True, slots=True)
class PoolTarget:
    """What to select: ``selector`` (matchLabels) and the ports, in rank order."""

    selector: Mapping[str, str]
    target_ports: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.selector:
            raise InvalidPool("selector must have at least one label")
        if len(self.selector) > MAX_SELECTOR_LABELS:
            raise InvalidPool(f"selector has more than {MAX_SELECTOR_LABELS} labels")
        if not 1 <= len(self.target_ports) <= MAX_TARGET_PORTS:
            raise InvalidPool(f"targetPorts must have 1 to {MAX_TARGET_PORTS} ports")
        if len(set(self.target_ports)) != len(self.target_ports):
            raise InvalidPool(f"targetPorts has duplicates: {list(self.target_ports)}")
        for p in self.target_ports:
            if not 1 <= p <= 65535:
                raise InvalidPool(f"targetPort {p} is not in 1..65535")

    @property
    def label_selector(self) -> str:
        """The selector in the API's ``labelSelector`` query syntax."""
        return format_selector(self.selector)


@dataclass(frozen=True, slots=True)
class PoolEndpoint:
    """One (pod, port) rank."""

    pod: str
    namespace: str
    rank: int
    address: str
    port: int
    labels: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def name(self) -> str:
        return f"{self.pod}-rank-{self.rank}"

    @property
    def host_port(self) -> str:
        return host_port(self.address, self.port)


def host_port(address: str, port: int) -> str:
    """``address:port``, with IPv6 addresses bracketed (the form in HTTP headers)."""
    if ":" in address and not address.startswith("["):
        return f"[{address}]:{port}"
    return f"{address}:{port}"


def format_selector(labels: Mapping[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items()))


def parse_selector(text: str) -> dict[str, str]:
    """``"k=v,k2=v2"`` (the ``--endpoint-selector`` flag) to a matchLabels map."""
    out: dict[str, str] = {}
    for raw in text.split(","):
        part = raw.strip()
        if not part:
            continue
        k, sep, v = part.partition("=")
        k, v = k.strip(), v.strip()
        if not sep or not _LABEL_KEY.match(k) or not _LABEL_VALUE.match(v):
            raise InvalidPool(f"selector term {part!r} is not of the form key=value")
        if k in out:
            raise InvalidPool(f"selector key {k!r} given twice")
        out[k] = v
    if not out:
        raise InvalidPool("selector is empty")
    return out


def parse_ports(text: str) -> tuple[int, ...]:
    """``"8000,8001"`` to ports (the ``--endpoint-target-ports`` flag)."""
    ports: list[int] = []
    for raw in text.split(","):
        part = raw.strip()
        if not part:
            continue
        try:
            ports.append(int(part))
        except ValueError:
            raise InvalidPool(f"port {part!r} is not an integer") from None
    return tuple(ports)


def pool_target(pool: InferencePool) -> PoolTarget:
    """The selector and ports of a v1 InferencePool; raises :class:`InvalidPool`."""
    sel = pool.spec.selector
    if sel.match_expressions:
        raise InvalidPool("selector.matchExpressions is not allowed in InferencePool v1")
    return PoolTarget(
        selector=MappingProxyType(dict(sel.match_labels)),
        target_ports=tuple(p.number for p in pool.spec.target_ports),
    )


def pod_ready(pod: Pod) -> bool:
    if pod.metadata.deletion_timestamp is not None or not pod.status.pod_ip:
        return False
    return any(c.type == "Ready" and c.status == "True" for c in pod.status.conditions)


def labels_match(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def _active_ports(pod: Pod) -> frozenset[int] | None:
    text = pod.metadata.annotations.get(ACTIVE_PORTS_ANNOTATION)
    if text is None:
        return None
    ports: set[int] = set()
    for raw in text.split(","):
        part = raw.strip()
        if part.isdigit():
            ports.add(int(part))
        elif part:
            log.warning(
                "pod %s: ignoring bad %s entry %r", pod.metadata.name, ACTIVE_PORTS_ANNOTATION, part
            )
    return frozenset(ports)


def pod_endpoints(pod: Pod, target: PoolTarget) -> list[PoolEndpoint]:
    """The endpoints of one pod (none unless ready and selected)."""
    if not pod_ready(pod) or not labels_match(target.selector, pod.metadata.labels):
        return []
    active = _active_ports(pod)
    labels = MappingProxyType(dict(pod.metadata.labels))
    return [
        PoolEndpoint(
            pod=pod.metadata.name,
            namespace=pod.metadata.namespace,
            rank=i,
            address=pod.status.pod_ip,
            port=port,
            labels=labels,
        )
        for i, port in enumerate(target.target_ports)
        if active is None or port in active
    ]


def resolve(pods: Iterable[Pod], target: PoolTarget) -> tuple[PoolEndpoint, ...]:
    """All endpoints, sorted by (pod, rank); a host:port claimed twice keeps the first."""
    out: dict[str, PoolEndpoint] = {}
    for pod in sorted(pods, key=lambda p: p.metadata.name):
        for ep in pod_endpoints(pod, target):
            out.setdefault(ep.host_port, ep)
    return tuple(out.values())


UpdateListener = Callable[[tuple[PoolEndpoint, ...]], None]


class PoolWatcher:
    """Keeps ``endpoints`` equal to the resolution of the live pool and pods.

    Exactly one of ``pool_name`` (InferencePool mode) or ``standalone`` (a fixed
    :class:`PoolTarget`) must be given. Listeners get every changed set.
    ``synced`` is True once the pods for the current target were listed; in pool
    mode it turns False while the pool does not exist or is invalid (the set is
    then empty). During an API server outage the last known set is kept.
    """

    def __init__(
        self,
        client: KubeClient,
        namespace: str,
        *,
        pool_name: str | None = None,
        standalone: PoolTarget | None = None,
        informer_factory: Callable[..., Informer[Pod]] | None = None,
    ) -> None:
        if (pool_name is None) == (standalone is None):
            raise InvalidPool("give exactly one of pool_name or a standalone selector+ports")
        self._client = client
        self.namespace = namespace
        self.pool_name = pool_name
        self._standalone = standalone
        self._informer_factory = informer_factory or Informer
        self._dirty = asyncio.Event()
        self._listeners: list[UpdateListener] = []
        self.target: PoolTarget | None = standalone
        self.pool_error: str | None = None
        self.endpoints: tuple[PoolEndpoint, ...] = ()
        self.synced = False
        self._published = False
        self._pool_informer: Informer[InferencePool] | None = None
        self._pod_informer: Informer[Pod] | None = None
        self._pod_task: asyncio.Task[None] | None = None
        self._synced_event = asyncio.Event()

    def subscribe(self, listener: UpdateListener) -> None:
        self._listeners.append(listener)

    @property
    def connected(self) -> bool:
        """True while every watch this needs is established."""
        infs = [i for i in (self._pool_informer, self._pod_informer) if i is not None]
        return bool(infs) and all(i.connected for i in infs)

    async def wait_synced(self) -> None:
        await self._synced_event.wait()

    def _mark(self) -> None:
        self._dirty.set()

    async def run(self) -> None:
        pool_task: asyncio.Task[None] | None = None
        try:
            if self.pool_name is not None:
                self._pool_informer = Informer(
                    self._client,
                    f"/apis/{POOL_GROUP}/{POOL_VERSION}/namespaces/{self.namespace}/inferencepools",
                    InferencePool,
                    field_selector=f"metadata.name={self.pool_name}",
                    on_change=self._mark,
                    name=f"inferencepool {self.namespace}/{self.pool_name}",
                )
                pool_task = asyncio.create_task(self._pool_informer.run())
            self._dirty.set()
            while True:
                await self._dirty.wait()
                self._dirty.clear()
                self._reconcile()
        finally:
            for t in (pool_task, self._pod_task):
                if t is not None:
                    t.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await t

    def _current_target(self) -> PoolTarget | None:
        if self._pool_informer is None:
            return self._standalone
        if not self._pool_informer.has_synced:
            return self.target  # not known yet: keep what we have
        pool = next(iter(self._pool_informer.store.values()), None)
        if pool is None:
            self.pool_error = f"InferencePool {self.namespace}/{self.pool_name} not found"
            return None
        try:
            target = pool_target(pool)
        except InvalidPool as e:
            self.pool_error = f"InferencePool {self.namespace}/{self.pool_name}: {e}"
            return None
        self.pool_error = None
        return target

    def _reconcile(self) -> None:
        target = self._current_target()
        if self._pool_informer is not None and not self._pool_informer.has_synced:
            return
        if target is None:
            if self.pool_error:
                log.error("%s", self.pool_error)
            self._stop_pods()
            self.target = None
            self.synced = False
            self._synced_event.clear()
            self._publish(())
            return
        if (
            self._pod_informer is None
            or self.target is None
            or dict(target.selector) != dict(self.target.selector)
        ):
            self._stop_pods()
            self._pod_informer = self._informer_factory(
                self._client,
                f"/api/v1/namespaces/{self.namespace}/pods",
                Pod,
                label_selector=target.label_selector,
                on_change=self._mark,
                name=f"pods {self.namespace} [{target.label_selector}]",
            )
            self._pod_task = asyncio.create_task(self._pod_informer.run())
        self.target = target
        if not self._pod_informer.has_synced:
            return  # keep publishing the previous set until the new list arrives
        self.synced = True
        self._synced_event.set()
        self._publish(resolve(self._pod_informer.store.values(), target))

    def _stop_pods(self) -> None:
        if self._pod_task is not None:
            self._pod_task.cancel()
            self._pod_task = None
        self._pod_informer = None

    def _publish(self, endpoints: tuple[PoolEndpoint, ...]) -> None:
        if self._published and endpoints == self.endpoints:
            return
        self._published = True
        self.endpoints = endpoints
        for listener in self._listeners:
            listener(endpoints)
