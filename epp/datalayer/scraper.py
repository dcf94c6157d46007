"""Metrics scraper: polls every endpoint's Prometheus ``/metrics`` into the datastore.

Design:

* One :class:`aiohttp.ClientSession` (keep-alive connection pool, ``limit`` =
  ``max_concurrency``) for all endpoints.
* A tick every ``interval_s`` starts one scrape per endpoint that has none in flight.
  At most one scrape per endpoint exists at any time, so a slow or hung server never
  piles up requests and never delays the others' ticks; a semaphore bounds how many
  run at once. Each scrape has a hard ``timeout_s``.
* The endpoint list is read from the datastore every tick, so endpoints that come
  and go are picked up at once; a removed endpoint's in-flight scrape is cancelled
  (removal listener) and its per-endpoint error series is dropped (bounded labels).
  A result that races a removal is ignored by ``Datastore.update_metrics``.
* Bodies are read up to ``max_body_bytes`` and parsed by the per-engine mapping
  (:mod:`epp.datalayer.engines`) with the selective parser (:mod:`epp.datalayer.promtext`),
  which only looks at the few series the mapping names.
* Any failure (connect error, timeout, non-200, oversized body, parse error, missing
  metric) increments ``llm_d_epp_datalayer_poll_errors{endpoint}`` and leaves the
  endpoint's metrics untouched: they age and the datastore marks them stale. A
  warning is logged when an endpoint starts failing and an info line when it
  recovers (not on every failed tick).
* Time comes from ``datastore.clock`` (``updated_at``) and an injectable ``sleep``
  (virtual-time tests). ``fetch`` can be injected to test scheduling without HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

import aiohttp

from epp.datalayer.engines import EngineMapping, build_engine_mappings, engine_of
from epp.datalayer.promtext import MetricsParseError
from epp.datastore import Datastore, Endpoint
from epp.metrics import DATALAYER_POLL_ERRORS

log = logging.getLogger(__name__)

Fetch = Callable[[Endpoint], Awaitable[bytes]]
Sleep = Callable[[float], Awaitable[None]]


class ScrapeError(Exception):
    """A scrape failed (HTTP status, size limit)."""


class MetricsScraper:
    """Scrapes every datastore endpoint's metrics each ``interval_s``."""

    def __init__(
        self,
        datastore: Datastore,
        *,
        interval_s: float = 0.1,
        timeout_s: float = 1.0,
        engine_configs: Any = None,
        default_engine: str = "vllm",
        session: aiohttp.ClientSession | None = None,
        max_concurrency: int = 64,
        scheme: str = "http",
        path: str = "/metrics",
        max_body_bytes: int = 8 * 1024 * 1024,
        sleep: Sleep = asyncio.sleep,
        fetch: Fetch | None = None,
    ) -> None:
        if interval_s <= 0 or timeout_s <= 0:
            raise ValueError("interval_s and timeout_s must be > 0")
        if max_concurrency < 1:
            raise ValueError("max_concurrency must be >= 1")
        if scheme not in ("http", "https"):
            raise ValueError(f"scheme must be http or https, got {scheme!r}")
        self._ds = datastore
        self._interval_s = interval_s
        self._timeout_s = timeout_s
        self._mappings = build_engine_mappings(engine_configs)
        if default_engine not in self._mappings:
            raise ValueError(
                f"defaultEngine {default_engine!r} is not a known engine "
                f"({', '.join(sorted(self._mappings))})"
            )
        self._default_engine = default_engine
        self._session = session
        self._owns_session = session is None and fetch is None
        self._max_concurrency = max_concurrency
        self._sem = asyncio.Semaphore(max_concurrency)
        self._scheme = scheme
        self._path = path if path.startswith("/") else "/" + path
        self._max_body = max_body_bytes
        self._sleep = sleep
        self._fetch: Fetch = fetch or self._http_fetch
        self._inflight: dict[str, asyncio.Task[None]] = {}
        self._unknown_engines: set[str] = set()
        #: Endpoints whose last scrape failed (a warning is logged on the transition).
        self._failing: set[str] = set()
        #: Cumulative counters, for observability and tests.
        self.scrapes = 0
        self.errors = 0
        #: CPU seconds (this thread) spent decoding + parsing bodies.
        self.parse_seconds = 0.0
        datastore.on_endpoint_removed(self._on_removed)

    # -- lifecycle -----------------------------------------------------------

    async def run(self) -> None:
        """Scrape until cancelled."""
        if self._owns_session:
            connector = aiohttp.TCPConnector(
                limit=self._max_concurrency, ssl=self._scheme != "https"
            )
            self._session = aiohttp.ClientSession(connector=connector)
        try:
            while True:
                self.tick()
                await self._sleep(self._interval_s)
        finally:
            tasks = list(self._inflight.values())
            for t in tasks:
                t.cancel()
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
            self._inflight.clear()
            if self._owns_session and self._session is not None:
                await self._session.close()
                self._session = None

    def tick(self) -> int:
        """Start a scrape for every endpoint without one in flight; returns how many."""
        started = 0
        for ep in self._ds.endpoints():
            key = ep.key
            if key in self._inflight:
                continue
            task = asyncio.create_task(self._scrape(ep), name=f"scrape {key}")
            self._inflight[key] = task
            task.add_done_callback(functools.partial(self._done, key))
            started += 1
        return started

    def inflight(self) -> int:
        return len(self._inflight)

    def _done(self, key: str, task: asyncio.Task[None]) -> None:
        if self._inflight.get(key) is task:
            del self._inflight[key]

    def _on_removed(self, key: str) -> None:
        task = self._inflight.pop(key, None)
        if task is not None:
            task.cancel()
        self._failing.discard(key)
        with contextlib.suppress(KeyError):
            DATALAYER_POLL_ERRORS.remove(key)

    # -- one scrape ----------------------------------------------------------

    def mapping_for(self, ep: Endpoint) -> EngineMapping:
        engine = engine_of(ep, self._default_engine)
        mapping = self._mappings.get(engine)
        if mapping is None:
            if engine not in self._unknown_engines:
                self._unknown_engines.add(engine)
                log.warning(
                    "endpoint %s: unknown engine %r, using %r metric names",
                    ep.key,
                    engine,
                    self._default_engine,
                )
            mapping = self._mappings[self._default_engine]
        return mapping

    async def _scrape(self, ep: Endpoint) -> None:
        key = ep.key
        try:
            async with self._sem:
                async with asyncio.timeout(self._timeout_s):
                    body = await self._fetch(ep)
                t0 = time.thread_time()
                text = body.decode("utf-8", errors="replace")
                metrics = self.mapping_for(ep).parse(text)
                self.parse_seconds += time.thread_time() - t0
        except asyncio.CancelledError:
            raise
        except (TimeoutError, aiohttp.ClientError, OSError, ScrapeError, MetricsParseError) as exc:
            self._failed(key, exc)
            return
        except Exception as exc:  # never let one endpoint's data kill the loop
            log.exception("unexpected error scraping %s", key)
            self._failed(key, exc)
            return
        self.scrapes += 1
        if key in self._failing:
            self._failing.discard(key)
            log.info("metrics scrape of %s recovered", key)
        self._ds.update_metrics(key, replace(metrics, updated_at=self._ds.clock()))

    def _failed(self, key: str, exc: BaseException) -> None:
        self.errors += 1
        if self._ds.get(key) is None:
            return  # removed meanwhile: no label series, no state
        DATALAYER_POLL_ERRORS.labels(endpoint=key).inc()
        if key not in self._failing:
            self._failing.add(key)
            log.warning(
                "metrics scrape of %s failed (%s: %s); its metrics will go stale until it recovers",
                key,
                type(exc).__name__,
                exc or "timeout",
            )
        else:
            log.debug("scrape %s failed: %s: %s", key, type(exc).__name__, exc)

    def url_for(self, ep: Endpoint) -> str:
        return f"{self._scheme}://{ep.metrics_host_port}{self._path}"

    async def _http_fetch(self, ep: Endpoint) -> bytes:
        session = self._session
        if session is None:
            raise RuntimeError("MetricsScraper.run() not started")
        async with session.get(self.url_for(ep), allow_redirects=False) as resp:
            if resp.status != 200:
                raise ScrapeError(f"HTTP {resp.status}")
            if resp.content_length is not None and resp.content_length > self._max_body:
                raise ScrapeError(f"body of {resp.content_length} bytes exceeds the limit")
            if resp.content_length is not None:
                return await resp.read()  # bounded by the check above
            chunks: list[bytes] = []
            size = 0
            async for chunk in resp.content.iter_chunked(65536):
                size += len(chunk)
                if size > self._max_body:
                    raise ScrapeError(f"body exceeds {self._max_body} bytes")
                chunks.append(chunk)
            return b"".join(chunks)
