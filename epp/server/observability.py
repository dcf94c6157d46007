"""The EPP's Prometheus endpoint (:9090 ``/metrics``) and the pool gauges it shows.

Request metrics are recorded where they happen (``epp.handlers``, scheduling);
pool state lives in the datastore, so :class:`PoolGauges` copies it into the
gauges of :mod:`epp.metrics` on a timer. Per-endpoint series are keyed on
``ip:port`` of pool members only; when an endpoint leaves the pool its series are
removed at the next refresh, so label sets stay bounded by the pool size.
Per-role gauges use the ``llm-d.ai/role`` label (``none`` when absent).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from epp import metrics
from epp.datastore import Datastore

log = logging.getLogger(__name__)

NO_ROLE = "none"


class PoolGauges:
    """Copies the datastore's pool state into the pool, role and endpoint gauges."""

    def __init__(self, datastore: Datastore) -> None:
        self._ds = datastore
        self._endpoint_series: set[tuple[str, str]] = set()
        self._roles: set[str] = set()

    def refresh(self) -> None:
        snap = self._ds.snapshot()
        series: set[tuple[str, str]] = set()
        ready: dict[str, int] = defaultdict(int)
        queue: dict[str, float] = defaultdict(float)
        kv: dict[str, float] = defaultdict(float)
        for view in snap.endpoints:
            role = view.endpoint.role or NO_ROLE
            key = (view.key, role)
            series.add(key)
            m = view.metrics
            metrics.ENDPOINT_QUEUE.labels(*key).set(m.waiting)
            metrics.ENDPOINT_RUNNING.labels(*key).set(m.running)
            metrics.ENDPOINT_KV.labels(*key).set(m.kv_cache_usage)
            ready[role] += 0 if view.stale else 1
            queue[role] += m.waiting
            kv[role] += m.kv_cache_usage
        for key in self._endpoint_series - series:
            for g in (metrics.ENDPOINT_QUEUE, metrics.ENDPOINT_RUNNING, metrics.ENDPOINT_KV):
                with contextlib.suppress(KeyError):
                    g.remove(*key)
        self._endpoint_series = series
        counts: dict[str, int] = defaultdict(int)
        for _, role in series:
            counts[role] += 1
        roles = set(counts)
        for role in roles:
            metrics.POOL_READY_ENDPOINTS.labels(role).set(ready[role])
            metrics.POOL_AVG_QUEUE.labels(role).set(queue[role] / counts[role])
            metrics.POOL_AVG_KV.labels(role).set(kv[role] / counts[role])
        for role in self._roles - roles:
            for g in (metrics.POOL_READY_ENDPOINTS, metrics.POOL_AVG_QUEUE, metrics.POOL_AVG_KV):
                with contextlib.suppress(KeyError):
                    g.remove(role)
        self._roles = roles

    async def run(self, interval_s: float) -> None:
        while True:
            try:
                self.refresh()
            except Exception:
                log.exception("pool gauge refresh failed")
            await asyncio.sleep(interval_s)


async def _metrics(_: web.Request) -> web.Response:
    body = generate_latest(metrics.REGISTRY)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def metrics_app() -> web.Application:
    app = web.Application()
    app.router.add_get("/metrics", _metrics)
    return app


async def start_metrics_server(host: str, port: int) -> web.AppRunner:
    runner = web.AppRunner(metrics_app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    return runner
