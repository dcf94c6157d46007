"""Closed-loop HTTP load generator (fallback when ``wrk`` is not installed).

``concurrency`` workers each POST the body, wait for the answer and repeat, for
``duration`` seconds, in this separate process (uvloop). Prints one JSON object
in the shape ``envoy_overhead.parse_wrk`` returns. It costs more CPU per request
than wrk, which competes with what is measured on a small machine: prefer wrk.

    python benchmarks/epp/aiohttp_load.py URL BODY_FILE CONCURRENCY DURATION_S
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

import aiohttp
import orjson


async def _run(url: str, body: bytes, concurrency: int, duration_s: float) -> dict[str, object]:
    lat: list[float] = []
    bad = 0
    deadline = time.perf_counter() + duration_s
    conn = aiohttp.TCPConnector(limit=concurrency)
    headers = {"content-type": "application/json"}
    async with aiohttp.ClientSession(connector=conn) as session:

        async def worker() -> None:
            nonlocal bad
            while time.perf_counter() < deadline:
                t0 = time.perf_counter()
                async with session.post(url, data=body, headers=headers) as r:
                    await r.read()
                    if r.status >= 300:
                        bad += 1
                lat.append(time.perf_counter() - t0)

        t_start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - t_start
    lat.sort()

    def pct(p: float) -> float:
        return round(lat[min(len(lat) - 1, int(p / 100 * len(lat)))] * 1000, 3) if lat else 0.0

    return {
        "rps": round(len(lat) / elapsed, 2),
        "requests": len(lat),
        "p50_ms": pct(50),
        "p75_ms": pct(75),
        "p90_ms": pct(90),
        "p99_ms": pct(99),
        "non_2xx": bad,
        "socket_errors": "",
    }


def main() -> None:
    url, body_file, conc, dur = sys.argv[1:5]
    body = Path(body_file).read_bytes()
    try:
        import uvloop

        res = uvloop.run(_run(url, body, int(conc), float(dur)))
    except ImportError:  # pragma: no cover
        res = asyncio.run(_run(url, body, int(conc), float(dur)))
    sys.stdout.write(orjson.dumps(res).decode() + "\n")


if __name__ == "__main__":
    main()
