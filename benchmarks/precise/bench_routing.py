"""Routing quality on the simulator fleet: precise vs approximate prefix affinity vs
load-only vs round robin.

    .venv/bin/python benchmarks/precise/bench_routing.py [--quick] [--json-out FILE]

A multi-turn chat-like workload (sessions with a long private context, several turns
each, turns of one session sequential, sessions interleaved by concurrent clients)
runs against a fleet of ``pdroute sim`` replicas (a separate process, so the
simulated engines do not share this process's CPU) whose KV caches cannot hold
every session at once. Each policy gets a fresh fleet. Requests go through the real
EPP director (parse, prepare-data, scheduler, pre-request hooks) in this process,
then straight to the chosen replica (streaming, so TTFT is measured at the first
chunk, routing and tokenization included). Metrics are scraped by the EPP's
scraper; the precise policy receives the fleet's KV events on a bound ZMQ socket
and tokenizes through the replicas' ``/tokenize``.

Reported per policy: engine prefix-cache hit rate (``vllm:prefix_cache_hits`` /
``queries`` summed over the fleet), TTFT p50/p90/mean, the EPP's routing time
p50/p99 as the client sees it (this process also runs the clients, so it includes
event-loop queueing) and, for precise, the producer's own prepare time (tokenize +
block keys), and the request share of the busiest replica. Latencies are simulated
(``llama-3.1-8b-h100`` profile: prefill 250 us/token), so compare policies, not
absolute numbers. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import aiohttp
import msgspec

import epp.scheduling.plugins  # noqa: F401  (registers every plugin type)
from epp.datalayer.scraper import MetricsScraper
from epp.datalayer.tokenizer import TokenizedPrompt
from epp.datastore import Datastore, Endpoint
from epp.requestcontrol.api import IncomingRequest, ResponseInfo
from epp.requestcontrol.director import build_director
from epp.scheduling.plugins.precise_prefix_cache import (
    EVENTS_ENDPOINT_LABEL,
    PrecisePrefixCacheProducer,
)

MODEL = "bench-model"
HEAD = "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\n"
PROFILE = "llama-3.1-8b-h100"

POLICIES: dict[str, str | None] = {
    "precise": HEAD
    + """plugins:
- type: precise-prefix-cache-producer
  parameters:
    speculativeIndexing: true
    tokenProcessorConfig: {blockSize: 16}
    kvEventsConfig: {discoverPods: true}
- type: prefix-cache-scorer
  parameters: {prefixMatchInfoProducerName: precise-prefix-cache-producer}
- type: queue-scorer
- type: kv-cache-utilization-scorer
schedulingProfiles:
- name: default
  plugins:
  - {pluginRef: prefix-cache-scorer, weight: 3}
  - {pluginRef: queue-scorer, weight: 2}
  - {pluginRef: kv-cache-utilization-scorer, weight: 2}
""",
    # Same, with the tokenizer in-process (like a local tokenizer.json): shows the
    # routing cost without the /tokenize round trip.
    "precise-local": "PRECISE",
    "approximate": HEAD
    + """plugins:
- type: approx-prefix-cache-producer
- type: prefix-cache-scorer
- type: queue-scorer
- type: kv-cache-utilization-scorer
schedulingProfiles:
- name: default
  plugins:
  - {pluginRef: prefix-cache-scorer, weight: 3}
  - {pluginRef: queue-scorer, weight: 2}
  - {pluginRef: kv-cache-utilization-scorer, weight: 2}
""",
    "load-only": HEAD
    + """plugins:
- type: queue-scorer
- type: kv-cache-utilization-scorer
schedulingProfiles:
- name: default
  plugins:
  - {pluginRef: queue-scorer, weight: 2}
  - {pluginRef: kv-cache-utilization-scorer, weight: 2}
""",
    "round-robin": None,
    # Sees every cache: asks each replica how much of the prompt it holds right now
    # (the simulator's /sim/cached_prefix) and scores like the precise policy with
    # that truth. The bar precise routing is measured against.
    "oracle": "ORACLE",
}


@dataclass
class Workload:
    sessions: int
    turns: int
    context_words: int
    concurrency: int
    seed: int = 11
    docs: list[str] = field(default_factory=list)

    def build(self) -> None:
        rng = random.Random(self.seed)
        vocab = [f"w{i}" for i in range(5000)]
        self.docs = [
            f"Session {s} context: "
            + " ".join(rng.choice(vocab) for _ in range(self.context_words))
            for s in range(self.sessions)
        ]


@dataclass
class Sample:
    ttft_s: float
    route_s: float
    endpoint: str


def _counter_sum(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            head, _, value = line.rpartition(" ")
            if head.split("{", 1)[0] in (name, name + "_total"):
                total += float(value)
    return total


async def _scrape_cache(addresses: list[str]) -> tuple[float, float]:
    hits = queries = 0.0
    async with aiohttp.ClientSession() as s:
        for a in addresses:
            async with s.get(f"http://{a}/metrics") as r:
                text = await r.text()
            hits += _counter_sum(text, "vllm:prefix_cache_hits")
            queries += _counter_sum(text, "vllm:prefix_cache_queries")
    return hits, queries


async def _wait_healthy(addresses: list[str], limit_s: float = 60.0) -> None:
    async with aiohttp.ClientSession() as s, asyncio.timeout(limit_s):
        for a in addresses:
            while True:
                try:
                    async with s.get(f"http://{a}/health") as r:
                        if r.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)


async def _join_event_streams(prod: PrecisePrefixCacheProducer, addresses: list[str]) -> None:
    """PUB/SUB drops messages until the subscription propagates: send fresh small
    prompts to each replica until its events show up."""
    async with aiohttp.ClientSession() as s, asyncio.timeout(30):
        for i, a in enumerate(addresses):
            n = 0
            while prod.index.held_count(a) == 0:
                n += 1
                body = {"model": MODEL, "prompt": f"join {i} {n} " * 20, "max_tokens": 1}
                async with s.post(f"http://{a}/v1/completions", json=body) as r:
                    await r.read()
                await asyncio.sleep(0.05)


class _SimTokenizer:
    """The simulator's deterministic tokenizer as a request tokenizer (benchmark
    only: the EPP itself never imports pdroute.sim)."""

    def __init__(self) -> None:
        from pdroute.sim.tokenizer import Tokenizer

        self._tok = Tokenizer()

    async def tokenize(
        self, model: str, *, prompt: str | None = None, messages: Any = None
    ) -> TokenizedPrompt:
        ids = self._tok.encode(prompt or "")
        return TokenizedPrompt(ids, len(ids))


async def _oracle_pick(http: aiohttp.ClientSession, addresses: list[str], prompt: str) -> str:
    """The precise policy's scoring (prefix 3, queue 2, KV usage 2) with the truth:
    each replica reports how much of the prompt its cache holds right now."""

    async def probe(a: str) -> dict[str, Any]:
        async with http.post(f"http://{a}/sim/cached_prefix", json={"prompt": prompt}) as r:
            return dict(msgspec.json.decode(await r.read()))

    states = await asyncio.gather(*(probe(a) for a in addresses))
    queues = [int(d["waiting"]) for d in states]
    lo, hi = min(queues), max(queues)
    best, best_score = addresses[0], -1.0
    for a, d, q in zip(addresses, states, queues, strict=True):
        blocks = max(1, int(d["prompt_tokens"]) // 16)
        prefix = min(1.0, int(d["cached_blocks"]) / blocks)
        queue = 1.0 if hi == lo else (hi - q) / (hi - lo)
        score = 3 * prefix + 2 * queue + 2 * (1.0 - float(d["kv_cache_usage"]))
        if score > best_score:
            best, best_score = a, score
    return best


async def run_policy(
    name: str, config: str | None, wl: Workload, *, replicas: int, blocks: int, epps: int
) -> dict[str, Any]:
    local_tokenizer = config == "PRECISE"
    if local_tokenizer:
        config = POLICIES["precise"]
    oracle = config == "ORACLE"
    if oracle:
        config = None
    # The sims bind their PUB sockets on loopback ports they pick; each EPP replica
    # dials every replica (llm-d discoverPods), so all replicas see the same events.
    argv = [
        sys.executable, "-m", "pdroute.cli", "sim", "--replicas", str(replicas),
        "--port", "0", "--model", MODEL, "--profile", PROFILE, "--block-size", "16",
        "--num-blocks", str(blocks), "--max-num-seqs", "64",
        "--kv-events-endpoint", "tcp://127.0.0.1:*",
    ]  # fmt: skip
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    assert proc.stdout is not None
    info = msgspec.json.decode(await asyncio.wait_for(proc.stdout.readline(), 60))
    addresses: list[str] = info["addresses"]
    ds = Datastore()
    ds.replace_endpoints(
        [
            Endpoint(
                f"sim{i}",
                a.rsplit(":", 1)[0],
                int(a.rsplit(":", 1)[1]),
                labels=MappingProxyType({EVENTS_ENDPOINT_LABEL: info["kv_event_endpoints"][i]}),
            )
            for i, a in enumerate(addresses)
        ]
    )
    directors = []
    producers: list[PrecisePrefixCacheProducer] = []
    if config:
        for _ in range(epps):
            d = build_director(ds, config_text=config, prepare_timeout_s=2.0)
            directors.append(d)
            for p in d.pipeline.plugins.values():
                if isinstance(p, PrecisePrefixCacheProducer):
                    if local_tokenizer:
                        p.tokenizer = _SimTokenizer()
                    p.reconcile_interval_s = 0.05
                    p.start()
                    producers.append(p)
    scraper_task = None
    try:
        await _wait_healthy(addresses)
        scraper = MetricsScraper(ds, interval_s=0.05)
        scraper_task = asyncio.get_running_loop().create_task(scraper.run())
        await asyncio.sleep(0.3)  # first scrape; event sockets connect
        for prod in producers:
            await _join_event_streams(prod, addresses)
        samples: list[Sample] = []
        queue: asyncio.Queue[int] = asyncio.Queue()
        for s in range(wl.sessions):
            queue.put_nowait(s)
        rr = [0]
        t_start = time.perf_counter()

        async def client(http: aiohttp.ClientSession) -> None:
            while True:
                try:
                    s = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                history = wl.docs[s]
                for t in range(wl.turns):
                    prompt = f"{history}\nUser: question {t} about session {s}?\nAssistant:"
                    body = {"model": MODEL, "prompt": prompt, "max_tokens": 8, "stream": True}
                    raw = msgspec.json.encode(body)
                    t0 = time.perf_counter()
                    decision = None
                    n_req = rr[0]
                    rr[0] += 1
                    if oracle:
                        ep = await _oracle_pick(http, addresses, prompt)
                    elif not directors:
                        ep = addresses[n_req % len(addresses)]
                    else:
                        # An L4 balancer spreads requests over the EPP replicas.
                        director = directors[n_req % len(directors)]
                        decision = await director.route(
                            IncomingRequest(
                                headers={":path": "/v1/completions", ":method": "POST"},
                                body=raw,
                                request_id=f"{s}-{t}",
                            )
                        )
                        ep = decision.endpoints[0]
                    t_routed = time.perf_counter()
                    ttft = None
                    answer = []
                    async with http.post(
                        f"http://{ep}/v1/completions",
                        data=raw,
                        headers={"content-type": "application/json"},
                    ) as r:
                        async for line in r.content:
                            if ttft is None and line.startswith(b"data:"):
                                ttft = time.perf_counter() - t0
                            if line.startswith(b"data: {"):
                                chunk = msgspec.json.decode(line[6:])
                                answer.append(chunk["choices"][0].get("text", ""))
                        status = r.status
                    if decision is not None:
                        decision.finish(ResponseInfo(status=status, served_endpoint=ep))
                    samples.append(Sample(ttft or 0.0, t_routed - t0, ep))
                    history = prompt + "".join(answer)

        async with aiohttp.ClientSession() as http:
            await asyncio.gather(*(client(http) for _ in range(wl.concurrency)))
        wall = time.perf_counter() - t_start
        hits, queries = await _scrape_cache(addresses)
    finally:
        if scraper_task is not None:
            scraper_task.cancel()
        for prod in producers:
            await prod.stop()
        proc.terminate()
        await proc.wait()
    ttfts = sorted(x.ttft_s for x in samples)
    routes = sorted(x.route_s for x in samples)
    share = {a: 0 for a in addresses}
    for x in samples:
        share[x.endpoint] = share.get(x.endpoint, 0) + 1
    n = len(samples)

    def pct(v: list[float], q: float) -> float:
        return v[min(len(v) - 1, int(q * len(v)))]

    out: dict[str, Any] = {
        "policy": name,
        "requests": n,
        "wall_s": wall,
        "prefix_cache_hit_rate": hits / queries if queries else 0.0,
        "ttft_p50_ms": pct(ttfts, 0.5) * 1e3,
        "ttft_p90_ms": pct(ttfts, 0.9) * 1e3,
        "ttft_mean_ms": statistics.mean(ttfts) * 1e3,
        "route_p50_ms": pct(routes, 0.5) * 1e3,
        "route_p99_ms": pct(routes, 0.99) * 1e3,
        "busiest_replica_share": max(share.values()) / n,
        "idlest_replica_share": min(share.values()) / n,
    }
    if producers:
        prep = sorted(d for p in producers for d in p.prepare_durations)
        if prep:
            out["precise_prepare_p50_ms"] = pct(prep, 0.5) * 1e3
            out["precise_prepare_p99_ms"] = pct(prep, 0.99) * 1e3
        out["kv_events_applied"] = sum(p.ingestor.counts["applied"] for p in producers)
        out["kv_events_gaps"] = sum(p.ingestor.counts["gap"] for p in producers)
    return out


async def amain(args: argparse.Namespace) -> dict[str, Any]:
    wl = Workload(
        sessions=12 if args.quick else 24,
        turns=4 if args.quick else 6,
        context_words=600 if args.quick else 1000,
        concurrency=8,
    )
    wl.build()
    replicas = 4
    # About 1.5 sessions' worth of growing context per replica slot: the fleet as a
    # whole holds every session only if sessions stay on one replica.
    blocks = args.blocks or (600 if args.quick else 1000)
    results = []
    for name, cfg in POLICIES.items():
        if args.policies and name not in args.policies:
            continue
        results.append(
            await run_policy(
                name, cfg, wl, replicas=replicas, blocks=blocks, epps=args.epp_replicas
            )
        )
    return {
        "workload": {
            "sessions": wl.sessions,
            "turns": wl.turns,
            "context_words": wl.context_words,
            "concurrency": wl.concurrency,
            "replicas": replicas,
            "num_blocks_per_replica": blocks,
            "epp_replicas": args.epp_replicas,
            "block_size": 16,
            "latency_profile": PROFILE,
        },
        "results": results,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json-out", type=Path)
    ap.add_argument("--policies", nargs="*", choices=list(POLICIES))
    ap.add_argument("--epp-replicas", type=int, default=1, help="active-active EPPs")
    ap.add_argument("--blocks", type=int, default=0, help="KV blocks per replica (pressure)")
    args = ap.parse_args()
    doc = asyncio.run(amain(args))
    text = msgspec.json.format(msgspec.json.encode(doc), indent=2)
    sys.stdout.write(text.decode() + "\n")
    if args.json_out:
        args.json_out.write_bytes(text)
    print(
        f"\n{'policy':<14} {'hit rate':>8} {'TTFT p50':>9} {'TTFT p90':>9} {'mean':>8}"
        f" {'route p50':>9} {'route p99':>9} {'prep p50':>8} {'max share':>9}"
    )
    for r in doc["results"]:
        prep = r.get("precise_prepare_p50_ms")
        print(
            f"{r['policy']:<14} {r['prefix_cache_hit_rate']:>8.1%} {r['ttft_p50_ms']:>7.1f}ms"
            f" {r['ttft_p90_ms']:>7.1f}ms {r['ttft_mean_ms']:>6.1f}ms {r['route_p50_ms']:>7.2f}ms"
            f" {r['route_p99_ms']:>7.2f}ms {'' if prep is None else f'{prep:.2f}ms':>8}"
            f" {r['busiest_replica_share']:>9.0%}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
