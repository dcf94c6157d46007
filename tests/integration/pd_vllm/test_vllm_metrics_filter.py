"""Real vLLM and the scraper's ``name[]`` filter: ``/metrics/?name[]=...``
(prometheus_client's app) holds exactly the samples the vLLM mapping reads and
parses to the same metrics as the whole page; ``/metrics`` ignores the filter
(which is why the scraper asks ``/metrics/``); the simulator filters alike."""

from __future__ import annotations

import asyncio

import pytest
from pd_vllm_helpers import PdPair, http

from epp.datalayer.scraper import MetricsScraper
from epp.datastore import Datastore, Endpoint
from pdroute.sim.metrics import SampleFilter

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(600)]


def test_vllm_serves_the_filtered_page_the_scraper_asks_for(vllm_pd: PdPair) -> None:
    srv = vllm_pd.decode
    ds = Datastore()
    ep = Endpoint("d", "127.0.0.1", srv.spec.port)
    ds.replace_endpoints([ep])
    scraper = MetricsScraper(ds)
    mapping = scraper.mapping_for(ep)

    code, whole = http("GET", f"{srv.url}/metrics", timeout=10)
    assert code == 200
    url = scraper.url_for(ep)
    assert url.startswith(f"{srv.url}/metrics/?name%5B%5D=")
    code, part = http("GET", url, timeout=10)
    assert code == 200
    # vLLM's /metrics route (prometheus-fastapi-instrumentator) ignores the filter.
    code, ignored = http("GET", url.replace("/metrics/?", "/metrics?"), timeout=10)
    assert code == 200 and len(ignored) * 2 > len(whole)
    whole_text, part_text = whole.decode(), part.decode()

    names = {
        ln.split("{")[0].split(" ")[0]
        for ln in part_text.splitlines()
        if ln and not ln.startswith("#")
    }
    # Required ones always; lora_requests_info only where LoRA is on.
    assert {"vllm:num_requests_waiting", "vllm:num_requests_running"} <= names
    assert {"vllm:kv_cache_usage_perc", "vllm:cache_config_info"} <= names
    assert names <= mapping.wanted
    assert len(part) * 10 < len(whole), (len(part), len(whole))
    # Idle server: the two reads agree, so the parses must too.
    assert mapping.parse(part_text) == mapping.parse(whole_text)
    # The simulator's filter gives vLLM's samples for the same page (vLLM's order
    # follows a set of collectors; the page's order is as good).
    sim = SampleFilter().apply(whole_text, sorted(mapping.wanted))
    assert sorted(ln for ln in sim.splitlines() if not ln.startswith("#")) == sorted(
        ln for ln in part_text.splitlines() if ln and not ln.startswith("#")
    )


async def test_scraper_reads_vllm_through_the_filter(vllm_pd: PdPair) -> None:
    srv = vllm_pd.prefill
    ds = Datastore()
    ds.replace_endpoints([Endpoint("p", "127.0.0.1", srv.spec.port)])
    scraper = MetricsScraper(ds, interval_s=0.2, timeout_s=5.0)
    task = asyncio.create_task(scraper.run())
    try:
        async with asyncio.timeout(30):
            while scraper.scrapes < 2:  # noqa: ASYNC110 - waiting on real HTTP scrapes
                await asyncio.sleep(0.05)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert scraper.errors == 0 and not scraper._unfiltered
    m = ds.metrics(srv.host_port)
    assert m is not None and m.block_size and m.num_blocks
