"""Scheduling latency of the EPP's scheduler and director (in-process, no network).

For each config (the built-in default: queue w2 + kv w2 + prefix w3; and the llm-d
P/D example) and prompt size, it routes chat requests over 16 endpoints with live-
looking metrics and a warm prefix index (groups of requests sharing a system
prompt), and reports percentiles of:

* ``schedule``: ``Scheduler.schedule`` (prefix hashing + match, filters, scorers,
  picker, profile handler) -- the number the targets refer to;
* ``route``: the whole ``Director.route`` (JSON parse, prompt extraction, admission,
  schedule, pre-request hooks incl. prefix learning) plus ``finish``.

Both are reported as wall-clock percentiles and, as ``*_cpu``, as thread CPU time
percentiles (on a shared machine the wall numbers include preemption by other
processes; the CPU numbers do not).

Usage: ``python benchmarks/epp/scheduling_latency.py [--requests N] [--json-only]``.
Prints one JSON document, then a table (unless --json-only).
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import random
import statistics
import sys
import time
from types import MappingProxyType
from typing import Any

import orjson

from epp.config import PD_EXAMPLE_PATH
from epp.datastore import Datastore, Endpoint, EndpointMetrics
from epp.requestcontrol import IncomingRequest, ResponseInfo, build_director
from epp.scheduling import LLMRequest

ENDPOINTS = 16
CHARS_PER_TOKEN = 4


def make_store(rng: random.Random, pd: bool) -> Datastore:
    now = [1000.0]
    ds = Datastore(clock=lambda: now[0])
    eps = []
    for i in range(ENDPOINTS):
        role = ("prefill" if i < ENDPOINTS // 2 else "decode") if pd else None
        labels = MappingProxyType({"llm-d.ai/role": role} if role else {})
        eps.append(Endpoint(f"vllm-{i}", f"10.0.{i // 250}.{i % 250}", 8000, labels=labels))
    ds.replace_endpoints(eps)
    for e in eps:
        ds.update_metrics(
            e.key,
            EndpointMetrics(
                waiting=rng.randint(0, 8),
                running=rng.randint(0, 32),
                kv_cache_usage=rng.random() * 0.9,
                updated_at=now[0],
            ),
        )
    return ds


def words(rng: random.Random, n_chars: int) -> str:
    vocab = [
        "alpha",
        "beta",
        "gamma",
        "delta",
        "kernel",
        "tensor",
        "cache",
        "route",
        "token",
        "prefix",
    ]
    return " ".join(rng.choices(vocab, k=n_chars // 5 + 1))[:n_chars]


def percentile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    k = min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))
    return s[k]


def summarize(samples_s: list[float]) -> dict[str, float]:
    ms = [x * 1000 for x in samples_s]
    return {
        "p50_ms": round(percentile(ms, 50), 4),
        "p90_ms": round(percentile(ms, 90), 4),
        "p99_ms": round(percentile(ms, 99), 4),
        "mean_ms": round(statistics.fmean(ms), 4),
    }


async def bench(
    config: str, prompt_tokens: int, n: int, seed: int, default_config: str | None = None
) -> dict[str, Any]:
    rng = random.Random(seed)
    pd = config == "pd"
    ds = make_store(rng, pd)
    director = build_director(
        ds, config_path=str(PD_EXAMPLE_PATH) if pd else default_config, rng=random.Random(seed)
    )
    groups = [words(rng, prompt_tokens * CHARS_PER_TOKEN * 3 // 4) for _ in range(8)]

    def body() -> bytes:
        system = rng.choice(groups)
        question = words(rng, prompt_tokens * CHARS_PER_TOKEN // 4)
        messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
        return orjson.dumps({"model": "qwen", "messages": messages, "max_tokens": 16})

    headers = {":path": "/v1/chat/completions", ":method": "POST"}
    # Warm-up: fill the prefix index, let caches settle.
    for _ in range(min(50, n)):
        d = await director.route(IncomingRequest(headers, body()))
        d.finish(ResponseInfo(status=200))

    sched: list[float] = []
    route: list[float] = []
    sched_cpu: list[float] = []
    route_cpu: list[float] = []
    scheduler = director.pipeline.scheduler
    perf = time.perf_counter
    cpu = time.thread_time
    for i in range(n):
        b = body()
        c0 = cpu()
        t0 = perf()
        dec = await director.route(IncomingRequest(headers, b, request_id=str(i)))
        dec.finish(ResponseInfo(status=200))
        route.append(perf() - t0)
        route_cpu.append(cpu() - c0)
        # Same work, scheduler only (prompt already extracted).
        req = dec.request
        assert req is not None
        llm = LLMRequest(req.request_id, req.model, prompt=req.prompt, api=req.api, headers=headers)
        snapshot = list(ds.snapshot().endpoints)
        c0 = cpu()
        t0 = perf()
        scheduler.schedule(llm, snapshot)
        sched.append(perf() - t0)
        sched_cpu.append(cpu() - c0)
    return {
        "config": config,
        "prompt_tokens": prompt_tokens,
        "prompt_chars": prompt_tokens * CHARS_PER_TOKEN,
        "endpoints": ENDPOINTS,
        "requests": n,
        "schedule": summarize(sched),
        "route": summarize(route),
        # Thread CPU time: what the numbers mean on a machine shared with other load.
        "schedule_cpu": summarize(sched_cpu),
        "route_cpu": summarize(route_cpu),
    }


async def main_async(args: argparse.Namespace) -> list[dict[str, Any]]:
    out = []
    for config in ("default", "pd"):
        for tokens in (2_000, 100_000):
            n = args.requests if tokens <= 10_000 else max(50, args.requests // 5)
            out.append(await bench(config, tokens, n, args.seed, args.config_file))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument(
        "--config-file", help="config for the 'default' rows (default: the built-in default)"
    )
    ap.add_argument("--json-only", action="store_true")
    args = ap.parse_args()
    results = asyncio.run(main_async(args))
    doc = {
        "benchmark": "epp.scheduling_latency",
        "python": sys.version.split()[0],
        "machine": platform.machine(),
        "targets_ms": {"schedule_p50_2k_tokens": 0.3, "schedule_p50_100k_tokens": 3.0},
        "results": results,
    }
    sys.stdout.write(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode() + "\n")
    if not args.json_only:
        hdr = (
            f"{'config':8} {'tokens':>8} {'sched p50':>10} {'sched p99':>10} {'route p50':>10} "
            f"{'route p99':>10} {'sched cpu50':>12} {'route cpu50':>12}  (ms)"
        )
        print(hdr)
        print("-" * len(hdr))
        for r in results:
            s, ro = r["schedule"], r["route"]
            sc, rc = r["schedule_cpu"], r["route_cpu"]
            print(
                f"{r['config']:8} {r['prompt_tokens']:>8} {s['p50_ms']:>10.3f} {s['p99_ms']:>10.3f} "
                f"{ro['p50_ms']:>10.3f} {ro['p99_ms']:>10.3f} {sc['p50_ms']:>12.3f} "
                f"{rc['p50_ms']:>12.3f}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
