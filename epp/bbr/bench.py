"""Benchmark: BBR's CPU per request (state machine + protobuf building), no network.

``python -m epp.bbr.bench`` feeds :class:`~epp.bbr.server.BodyRouter` the messages
Envoy would send for one request (headers + body in 16 KiB chunks) in full-duplex
and buffered mode, for a small and a large body, and reports CPU µs per request.
Prints a table and one JSON line.
"""

from __future__ import annotations

import asyncio
import sys
import time

import orjson
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from epp.bbr.server import BodyRouter

_Mode = processing_mode_pb2.ProcessingMode
_EOF = object()


def _messages(mode: int, body: bytes) -> list[pb.ProcessingRequest]:
    head = pb.ProcessingRequest(request_headers=pb.HttpHeaders(end_of_stream=False))
    head.protocol_config.request_body_mode = mode  # type: ignore[assignment]
    step = 16384 if mode == _Mode.FULL_DUPLEX_STREAMED else len(body)
    parts = [body[i : i + step] for i in range(0, len(body), step)]
    return [head] + [
        pb.ProcessingRequest(request_body=pb.HttpBody(body=p, end_of_stream=i == len(parts) - 1))
        for i, p in enumerate(parts)
    ]


async def _per_request_us(router: BodyRouter, msgs: list[pb.ProcessingRequest], n: int) -> float:
    sent: list[pb.ProcessingResponse] = []

    async def write(r: pb.ProcessingResponse) -> None:
        sent.append(r)

    t0 = time.process_time()
    for _ in range(n):
        it = iter([*msgs, _EOF])

        async def read(it: object = it) -> object:
            return next(it)  # type: ignore[call-overload]

        await router.run(read, write, _EOF)
        sent.clear()
    return (time.process_time() - t0) / n * 1e6


def main() -> int:
    router = BodyRouter()
    rows = []
    for size in (1_000, 200_000):
        body = orjson.dumps({"model": "llama-3-8b", "prompt": "x" * size})
        for name, mode in (
            ("full-duplex", _Mode.FULL_DUPLEX_STREAMED),
            ("buffered", _Mode.BUFFERED),
        ):
            msgs = _messages(mode, body)
            n = 2000 if size < 10_000 else 200
            us = min(asyncio.run(_per_request_us(router, msgs, n)) for _ in range(3))
            rows.append({"mode": name, "body_bytes": len(body), "cpu_us_per_request": round(us, 1)})
    print(f"{'mode':12} {'body bytes':>10} {'cpu µs/request':>15}")
    for r in rows:
        print(f"{r['mode']:12} {r['body_bytes']:>10} {r['cpu_us_per_request']:>15}")
    print(orjson.dumps({"benchmark": "bbr", "results": rows}).decode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
