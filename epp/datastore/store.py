"""The datastore: the set of ready endpoints plus each one's latest metrics.

Invariant: metrics are held only for endpoints currently in the set; removing an
endpoint drops its metrics and notifies listeners (indexes purge it).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from epp.datastore.types import Endpoint, EndpointMetrics, EndpointView, PoolSnapshot

Clock = Callable[[], float]
RemovalListener = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class EndpointSet:
    """A complete replacement of the endpoint set, as an endpoint source reports it."""

    endpoints: tuple[Endpoint, ...]


class Datastore:
    def __init__(self, *, clock: Clock = time.monotonic, staleness_s: float = 2.0) -> None:
        self._clock = clock
        self._staleness_s = staleness_s
        self._endpoints: dict[str, Endpoint] = {}
        self._metrics: dict[str, EndpointMetrics] = {}
        self._removal_listeners: list[RemovalListener] = []
        self._synced = False
        self._snapshot: PoolSnapshot | None = None

    @property
    def clock(self) -> Clock:
        return self._clock

    @property
    def synced(self) -> bool:
        """True once an endpoint source has delivered its first complete set."""
        return self._synced

    def on_endpoint_removed(self, listener: RemovalListener) -> None:
        self._removal_listeners.append(listener)

    def replace_endpoints(self, endpoints: Iterable[Endpoint]) -> None:
        new = {e.key: e for e in endpoints}
        removed = [k for k in self._endpoints if k not in new]
        self._endpoints = new
        for key in removed:
            self._metrics.pop(key, None)
        self._synced = True
        self._snapshot = None
        for key in removed:
            for listener in self._removal_listeners:
                listener(key)

    def endpoints(self) -> list[Endpoint]:
        return list(self._endpoints.values())

    def get(self, key: str) -> Endpoint | None:
        return self._endpoints.get(key)

    def update_metrics(self, key: str, metrics: EndpointMetrics) -> None:
        if key in self._endpoints:
            self._metrics[key] = metrics
            self._snapshot = None

    def metrics(self, key: str) -> EndpointMetrics | None:
        return self._metrics.get(key)

    def snapshot(self) -> PoolSnapshot:
        now = self._clock()
        cached = self._snapshot
        # Staleness depends on the clock, so a cached snapshot is reused only briefly.
        if cached is not None and now - cached.taken_at < 0.005:
            return cached
        views = []
        empty = EndpointMetrics()
        for key, ep in self._endpoints.items():
            m = self._metrics.get(key, empty)
            stale = m.updated_at == 0.0 or now - m.updated_at > self._staleness_s
            views.append(EndpointView(ep, m, stale))
        snap = PoolSnapshot(tuple(views), now)
        self._snapshot = snap
        return snap
