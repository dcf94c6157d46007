"""The datastore: the set of ready endpoints plus each one's latest metrics.

Invariant: metrics are held only for endpoints currently in the set; removing an
endpoint drops its metrics and notifies listeners (indexes purge it).

Snapshots are cached: :meth:`Datastore.snapshot` is called once per request, and
the pool changes only when a source replaces the set, a scrape updates one
endpoint's metrics, or a fresh endpoint's metrics age past the staleness
threshold. The cached snapshot is therefore returned for as long as its oldest
fresh sample is still fresh (the same ``now - updated_at > staleness`` test that
marks a view stale), and rebuilt otherwise; a metrics update replaces only that
endpoint's view. A snapshot equals what a fresh evaluation at ``now`` would give.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from epp.datastore.types import Endpoint, EndpointMetrics, EndpointView, PoolSnapshot

Clock = Callable[[], float]
_INF = float("inf")
_NO_METRICS = EndpointMetrics()
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
        #: Views by key in endpoint order (``stale`` as of the last build).
        self._views: dict[str, EndpointView] = {}
        #: Keys whose metrics changed since the views were built (current members only).
        self._dirty: set[str] = set()
        #: Oldest ``updated_at`` among the cached snapshot's fresh views (inf: none).
        self._oldest_fresh = _INF
        self._built_at = -_INF

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
        self._views = {}
        self._dirty.clear()
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
            self._dirty.add(key)

    def metrics(self, key: str) -> EndpointMetrics | None:
        return self._metrics.get(key)

    def _is_stale(self, m: EndpointMetrics, now: float) -> bool:
        return m.updated_at == 0.0 or now - m.updated_at > self._staleness_s

    def snapshot(self) -> PoolSnapshot:
        """The pool as of now (cached while nothing changed; see the module doc)."""
        now = self._clock()
        cached = self._snapshot
        if (
            cached is not None
            and now >= self._built_at
            and not now - self._oldest_fresh > self._staleness_s
        ):
            return cached
        views = self._views
        empty = _NO_METRICS
        if len(views) != len(self._endpoints) or now < self._built_at:
            # The set changed (or the clock went back): evaluate every view.
            views = self._views = {}
            for key, ep in self._endpoints.items():
                m = self._metrics.get(key, empty)
                views[key] = EndpointView(ep, m, self._is_stale(m, now))
        else:
            for key in self._dirty:  # metrics updated since the last build
                m = self._metrics.get(key, empty)
                views[key] = EndpointView(self._endpoints[key], m, self._is_stale(m, now))
        self._dirty.clear()
        oldest = _INF
        for key, v in views.items():
            if v.stale:
                continue
            m = v.metrics
            if self._is_stale(m, now):
                views[key] = EndpointView(v.endpoint, m, True)
            elif m.updated_at < oldest:
                oldest = m.updated_at
        snap = PoolSnapshot(tuple(views.values()), now)
        self._snapshot = snap
        self._built_at = now
        self._oldest_fresh = oldest
        return snap
