"""The server's engine driver: virtual-time steps, wake-ups only when someone must see them."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator

import aiohttp
import pytest

from pdroute.sim import SimConfig, SimFleet, get_profile
from pdroute.sim.server import SimServer

PROMPT = "benchmark prompt words " * 10  # 61 tokens


@pytest.fixture
async def fleet() -> AsyncIterator[SimFleet]:
    async with SimFleet(SimConfig(model="m", profile=get_profile("fast")), replicas=1) as f:
        yield f


async def completion(s: aiohttp.ClientSession, addr: str, max_tokens: int) -> dict[str, object]:
    body = {"prompt": PROMPT, "max_tokens": max_tokens}
    async with s.post(f"http://{addr}/v1/completions", json=body) as r:
        assert r.status == 200
        out: dict[str, object] = await r.json()
        return out


def metric(text: str, name: str) -> float:
    m = re.search(rf"^vllm:{name}{{[^}}]*}} (\S+)$", text, re.M)
    assert m is not None, name
    return float(m.group(1))


async def test_non_streaming_request_skips_the_wake_ups_in_between(
    fleet: SimFleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    wakes = [0]
    orig = SimServer._on_timer

    def counting(self: SimServer) -> None:
        wakes[0] += 1
        orig(self)

    monkeypatch.setattr(SimServer, "_on_timer", counting)
    async with aiohttp.ClientSession() as s:
        for _ in range(5):
            await completion(s, fleet.addresses[0], 20)
    assert wakes[0] <= 5 * 3  # arrival + finish (+ one spare), not one per token (20)
    stats = fleet.servers[0].stats
    assert stats.generation_tokens == 100
    # the model's ITL, exactly: steps end at their virtual times
    assert stats.h_itl.count == 5 * 19
    assert stats.h_itl.sum == pytest.approx(5 * 19 * 0.001)


async def test_metrics_mid_request_show_the_steps_done_so_far(fleet: SimFleet) -> None:
    addr = fleet.addresses[0]
    async with aiohttp.ClientSession() as s:
        task = asyncio.ensure_future(completion(s, addr, 300))  # ~0.3 s of 1 ms steps
        await asyncio.sleep(0.1)
        async with s.get(f"http://{addr}/metrics") as r:
            text = await r.text()
        running = metric(text, "num_requests_running")
        tokens = metric(text, "generation_tokens_total")
        await task
    assert running == 1.0
    assert 20 <= tokens <= 200  # ~100 steps ended by now (a loaded machine runs late)


async def test_arrival_joins_at_the_next_step_not_after_the_long_request(
    fleet: SimFleet,
) -> None:
    addr = fleet.addresses[0]
    loop = asyncio.get_running_loop()
    async with aiohttp.ClientSession() as s:
        long = asyncio.ensure_future(completion(s, addr, 400))  # ~0.4 s
        await asyncio.sleep(0.05)
        t0 = loop.time()
        await completion(s, addr, 5)
        short_s = loop.time() - t0
        assert not long.done()
        await long
    assert short_s < 0.2  # ~6 ms of steps; not the ~0.35 s the long request has left
    assert fleet.servers[0].stats.generation_tokens == 405


async def test_kv_events_go_out_at_their_step_not_at_the_finish() -> None:
    cfg = SimConfig(model="m", profile=get_profile("fast"), kv_events_endpoint="tcp://127.0.0.1:*")
    async with SimFleet(cfg, replicas=1) as f, aiohttp.ClientSession() as s:
        srv = f.servers[0]
        loop = asyncio.get_running_loop()
        published: list[float] = []
        publish = srv.engine.on_events
        assert publish is not None

        def record(events: list[object]) -> None:
            published.append(loop.time())
            publish(events)

        srv.engine.on_events = record
        t0 = loop.time()
        await completion(s, f.addresses[0], 200)  # ~0.2 s
    assert published and published[0] - t0 < 0.1  # the prompt's BlockStored, after prefill
