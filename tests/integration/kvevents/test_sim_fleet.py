"""Precise routing end to end against the simulator fleet (pdroute.sim): the sims
publish vLLM KV events over real ZMQ, the EPP tokenizes through their /tokenize,
and a request lands on the replica that holds its prefix blocks."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from types import MappingProxyType

import aiohttp

import epp.scheduling.plugins.precise_prefix_cache  # noqa: F401  (registers the types)
from epp.config import load_config_text
from epp.datastore import Datastore, Endpoint, EndpointMetrics
from epp.scheduling import CycleState, LLMRequest, Pipeline, build_pipeline
from epp.scheduling.plugins.precise_prefix_cache import (
    EVENTS_ENDPOINT_LABEL,
    REPLAY_ENDPOINT_LABEL,
    PrecisePrefixCacheProducer,
)
from pdroute.sim import SimConfig, SimFleet
from pdroute.sim.latency import get_profile

MODEL = "m"
NOW = 100.0
CONFIG = """apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: precise-prefix-cache-producer
  parameters:
    tokenProcessorConfig: {{blockSize: 16}}
    kvEventsConfig: {{{events}}}
- type: prefix-cache-scorer
  parameters: {{prefixMatchInfoProducerName: precise-prefix-cache-producer}}
- type: queue-scorer
schedulingProfiles:
- name: default
  plugins:
  - {{pluginRef: prefix-cache-scorer, weight: 3}}
  - {{pluginRef: queue-scorer, weight: 1}}
"""

SYSTEM = "You are a careful assistant that answers questions about routing. " * 12


async def eventually(cond: Callable[[], bool], limit_s: float = 10.0) -> None:
    async with asyncio.timeout(limit_s):
        while not cond():  # noqa: ASYNC110 - polling a plain predicate
            await asyncio.sleep(0.02)


async def complete(address: str, prompt: str) -> None:
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            f"http://{address}/v1/completions",
            json={"model": MODEL, "prompt": prompt, "max_tokens": 2},
        ) as r,
    ):
        assert r.status == 200, await r.text()


async def route(pipe: Pipeline, ds: Datastore, prompt: str) -> tuple[str, CycleState]:
    req = LLMRequest("r", MODEL, prompt=prompt, body={"model": MODEL, "prompt": prompt})
    cands = list(ds.snapshot().endpoints)
    cycle = CycleState()
    for h in pipe.prepare_data:
        await h.prepare_data(cycle, req, cands)
    result, cycle = pipe.scheduler.schedule(req, cands, cycle)
    return result.primary.targets[0].key, cycle


def datastore(addresses: list[str], labels: list[dict[str, str]] | None = None) -> Datastore:
    ds = Datastore(clock=lambda: NOW)
    eps = []
    for i, a in enumerate(addresses):
        host, port = a.rsplit(":", 1)
        lab = MappingProxyType((labels or [{}] * len(addresses))[i])
        eps.append(Endpoint(f"sim{i}", host, int(port), labels=lab))
    ds.replace_endpoints(eps)
    for e in eps:
        ds.update_metrics(e.key, EndpointMetrics(block_size=16, num_blocks=4096, updated_at=NOW))
    return ds


def sim_config(**kw: object) -> SimConfig:
    return SimConfig(
        model=MODEL,
        profile=get_profile("fast"),
        block_size=16,
        num_blocks=4096,
        **kw,  # type: ignore[arg-type]
    )


async def warm_up(prod: PrecisePrefixCacheProducer, ds: Datastore, fleet: SimFleet) -> None:
    """Send fresh prompts to each replica until its event stream is joined (PUB/SUB
    drops messages until the subscription propagates; a cached prompt publishes
    nothing, so each attempt is new)."""
    for i, e in enumerate(ds.endpoints()):
        async with asyncio.timeout(10):
            n = 0
            while prod.index.held_count(e.key) == 0:
                n += 1
                await complete(fleet.addresses[i], f"warm-up {i} {n} " * 40)
                await asyncio.sleep(0.05)


async def check_affinity(pipe: Pipeline, ds: Datastore, fleet: SimFleet) -> None:
    prod = pipe.plugin("precise-prefix-cache-producer")
    assert isinstance(prod, PrecisePrefixCacheProducer)
    rng = random.Random(1)
    for round_ in range(3):
        target = rng.randrange(len(fleet.addresses))
        key = ds.endpoints()[target].key
        before = prod.index.held_count(key)
        shared = f"{SYSTEM} Session {round_}."
        await complete(fleet.addresses[target], shared + " First question?")
        # The prompt's blocks arrive in one event batch (one engine step).
        await eventually(lambda k=key, b=before: prod.index.held_count(k) > b)  # type: ignore[misc]
        chosen, cycle = await route(pipe, ds, shared + " A different follow-up?")
        info = prod.match_info(cycle)
        assert info is not None and info.total_blocks > 10
        assert chosen == key, (chosen, key, info.matches)
        # Most of the prompt is cached there; other replicas hold at most the
        # system prompt of earlier rounds.
        assert info.matches[key] >= info.total_blocks - 3
        assert all(n < info.matches[key] for k, n in info.matches.items() if k != key)


async def test_bind_mode_sims_connect_to_the_epp() -> None:
    ds = datastore([])
    cfg = CONFIG.format(events='zmqEndpoint: "tcp://127.0.0.1:0", discoverPods: false')
    pipe = build_pipeline(load_config_text(cfg), datastore=ds, rng=random.Random(0))
    prod = pipe.plugin("precise-prefix-cache-producer")
    assert isinstance(prod, PrecisePrefixCacheProducer)
    prod.reconcile_interval_s = 0.05
    prod.start()
    try:
        await eventually(lambda: prod.bound_address is not None)
        assert prod.bound_address is not None
        # Sims connect to the EPP (vLLM connects unless its endpoint is a wildcard);
        # their topics kv@<host>:<port>@<model> name the endpoints. ("{host}" keeps
        # the fleet from offsetting the port per replica like data-parallel ranks.)
        port = prod.bound_address.rsplit(":", 1)[1]
        sims = sim_config(
            kv_events_endpoint=f"tcp://{{host}}:{port}", replay_endpoint="tcp://127.0.0.1:*"
        )
        async with SimFleet(sims, replicas=3) as f:
            # Replay sockets are named per endpoint (label): what the PUB/SUB
            # handshake loses at start is recovered once a later message arrives.
            labels = []
            for s in f.servers:
                assert s.publisher is not None
                labels.append({REPLAY_ENDPOINT_LABEL: s.publisher.bound_replay_endpoint or ""})
            fresh = datastore(f.addresses, labels)
            ds.replace_endpoints(fresh.endpoints())
            for e in ds.endpoints():
                ds.update_metrics(
                    e.key, EndpointMetrics(block_size=16, num_blocks=4096, updated_at=NOW)
                )
            await warm_up(prod, ds, f)
            await check_affinity(pipe, ds, f)
            # Only the warm-up messages that raced the endpoint set were strangers.
            assert prod.ingestor.counts["unknown_endpoint"] <= 3
            assert prod.ingestor.counts["malformed"] == 0
    finally:
        await prod.stop()


async def test_connect_mode_epp_dials_each_sim_with_replay() -> None:
    cfg_sim = sim_config(
        kv_events_endpoint="tcp://127.0.0.1:*", replay_endpoint="tcp://127.0.0.1:*"
    )
    async with SimFleet(cfg_sim, replicas=3) as f:
        labels = []
        for s in f.servers:
            assert s.publisher is not None
            labels.append(
                {
                    EVENTS_ENDPOINT_LABEL: s.publisher.bound_endpoint or "",
                    REPLAY_ENDPOINT_LABEL: s.publisher.bound_replay_endpoint or "",
                }
            )
        ds = datastore(f.addresses, labels)
        cfg = CONFIG.format(events="discoverPods: true")
        pipe = build_pipeline(load_config_text(cfg), datastore=ds, rng=random.Random(0))
        prod = pipe.plugin("precise-prefix-cache-producer")
        assert isinstance(prod, PrecisePrefixCacheProducer)
        prod.reconcile_interval_s = 0.05
        # Blocks cached before the EPP subscribes are recovered through replay.
        early = SYSTEM + " Before the EPP started."
        await complete(f.addresses[2], early)
        prod.start()
        try:
            await eventually(
                lambda: len(prod._subscriber.connected() if prod._subscriber else []) == 3
            )
            await warm_up(prod, ds, f)
            await check_affinity(pipe, ds, f)
            await eventually(lambda: prod.ingestor.counts["replayed"] > 0)
            chosen, _ = await route(pipe, ds, early + " follow-up")
            assert chosen == ds.endpoints()[2].key
            # A replica leaving the pool is unsubscribed and purged.
            gone = ds.endpoints()[0].key
            ds.replace_endpoints(ds.endpoints()[1:])
            await eventually(lambda: gone not in prod._subscriber.connected())  # type: ignore[union-attr]
            assert prod.index.held_count(gone) == 0
        finally:
            await prod.stop()
