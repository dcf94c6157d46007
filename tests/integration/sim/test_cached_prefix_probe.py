"""The simulator's read-only cache probe (``/sim/cached_prefix``), used by the oracle
router in benchmarks/precise/bench_routing.py: it must report exactly what the
server's prefix cache holds, and must not change it."""

from __future__ import annotations

import aiohttp
import orjson

from pdroute.sim.config import SimConfig
from pdroute.sim.fleet import SimFleet
from pdroute.sim.latency import get_profile

MODEL = "m"


async def _probe(http: aiohttp.ClientSession, addr: str, prompt: str) -> dict[str, int]:
    async with http.post(f"http://{addr}/sim/cached_prefix", json={"prompt": prompt}) as r:
        assert r.status == 200
        return dict(orjson.loads(await r.read()))


async def test_probe_reports_cached_blocks_without_touching_the_cache() -> None:
    cfg = SimConfig(model=MODEL, profile=get_profile("instant"), block_size=16, port=0)
    prompt = " ".join(f"tok{i}" for i in range(200))
    async with SimFleet(cfg, replicas=2) as fleet, aiohttp.ClientSession() as http:
        a, b = fleet.addresses
        cold = await _probe(http, a, prompt)
        assert cold["cached_blocks"] == 0 and cold["prompt_tokens"] >= 200
        async with http.post(
            f"http://{a}/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 1}
        ) as r:
            assert r.status == 200
            usage = orjson.loads(await r.read())["usage"]
        warm = await _probe(http, a, prompt)
        full_blocks = usage["prompt_tokens"] // 16
        assert warm["cached_blocks"] == full_blocks
        assert warm["cached_tokens"] == full_blocks * 16
        assert warm["kv_cache_usage"] == fleet.servers[0].pool.usage()
        assert (await _probe(http, b, prompt))["cached_blocks"] == 0  # the other server
        assert (await _probe(http, a, "unrelated " + prompt))["cached_blocks"] == 0
        # Probing is read-only: the prefix-cache query counters did not move.
        stats = fleet.servers[0].stats
        before = (stats.prefix_cache_queries, stats.prefix_cache_hits, stats.prompt_tokens)
        await _probe(http, a, prompt)
        assert (stats.prefix_cache_queries, stats.prefix_cache_hits, stats.prompt_tokens) == before
        assert stats.prefix_cache_queries > 0  # the completion above did count
        async with http.post(f"http://{a}/sim/cached_prefix", json={"prompt": 3}) as r:
            assert r.status == 400
