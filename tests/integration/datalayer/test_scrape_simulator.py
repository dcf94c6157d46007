"""MetricsScraper against the vLLM-compatible simulator under load: queue, running,
KV usage and LoRA adapters move while requests run and settle afterwards."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import aiohttp

from epp.datalayer.scraper import MetricsScraper
from epp.datastore import Datastore, Endpoint, EndpointMetrics
from pdroute.sim.config import LoraModule, SimConfig
from pdroute.sim.latency import get_profile
from pdroute.sim.server import SimServer
from tests.integration.datalayer.waiting import until


async def _until(cond: Callable[[], bool], what: str, limit_s: float = 20.0) -> None:
    await until(cond, what, limit_s, 0.01)


async def test_scraper_follows_simulator_load() -> None:
    sim = SimServer(
        SimConfig(
            model="base",
            profile=get_profile("llama-3.1-8b-h100"),
            block_size=16,
            num_blocks=2000,
            max_num_seqs=2,
            lora_modules=(LoraModule("sql-lora", "/adapters/sql"),),
            max_loras=2,
        )
    )
    await sim.start()
    host, port = sim.address.rsplit(":", 1)
    ds = Datastore()
    ds.replace_endpoints([Endpoint("sim", host, int(port))])
    scraper = MetricsScraper(ds, interval_s=0.01, timeout_s=1.0)
    seen: list[EndpointMetrics] = []

    def record() -> bool:
        m = ds.metrics(sim.address)
        if m is not None and (not seen or m != seen[-1]):
            seen.append(m)
        return m is not None

    task = asyncio.create_task(scraper.run())
    try:
        await _until(record, "first scrape")
        first = seen[-1]
        assert (first.waiting, first.running, first.block_size, first.num_blocks) == (
            0,
            0,
            16,
            2000,
        )
        assert first.max_loras == 2 and first.hash_algo == "sha256"

        async with aiohttp.ClientSession() as session:

            async def one(model: str) -> int:
                body = {"model": model, "prompt": "hello " * 200, "max_tokens": 24}
                async with session.post(f"http://{sim.address}/v1/completions", json=body) as r:
                    await r.read()
                    return r.status

            reqs = [asyncio.create_task(one("sql-lora" if i == 0 else "base")) for i in range(5)]
            await _until(
                lambda: record() and seen[-1].running == 2 and seen[-1].waiting >= 1,
                "running at max_num_seqs with a queue",
            )
            assert any(m.kv_cache_usage > 0 for m in seen)
            await _until(
                lambda: record() and "sql-lora" in seen[-1].active_loras, "LoRA adapter running"
            )
            assert all(s == 200 for s in await asyncio.gather(*reqs))
        await _until(
            lambda: record() and seen[-1].running == 0 and seen[-1].waiting == 0, "idle again"
        )
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await sim.stop()
