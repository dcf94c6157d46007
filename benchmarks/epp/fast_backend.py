"""A minimal HTTP/1.1 model-server stand-in for overhead benchmarks (not a test fake).

One process serves many ports with a bare asyncio protocol (uvloop), so the
backends cost as little CPU as possible next to the thing being measured. Each
port answers every request with a small fixed JSON body naming itself, keeps the
connection alive, reads ``content-length`` and ``chunked`` request bodies, and
serves ``GET /metrics`` from a vLLM capture so the EPP's scraper sees real metrics;
like vLLM, ``/metrics/?name[]=...`` (prometheus_client's app) serves only the
samples named, ``/metrics`` always the whole page.

Usage: ``python benchmarks/epp/fast_backend.py --ports 18000,18001 [--metrics FILE]``;
prints ``ready`` on stdout once every port listens.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import sys
from pathlib import Path

from pdroute.sim.metrics import SampleFilter


class _Http(asyncio.Protocol):
    def __init__(self, answer: bytes, metrics: _Metrics) -> None:
        self._answer = answer
        self._metrics = metrics
        self._buf = b""
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # uvloop's own class

    def data_received(self, data: bytes) -> None:
        self._buf += data
        while True:
            consumed = self._one()
            if consumed == 0:
                return
            self._buf = self._buf[consumed:]

    def _one(self) -> int:
        buf = self._buf
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            return 0
        head = buf[:end].lower()
        pos = end + 4
        cl = head.find(b"\r\ncontent-length:")
        if cl >= 0:
            line_end = head.find(b"\r\n", cl + 2)
            raw = head[cl + 17 : line_end if line_end >= 0 else len(head)]
            n = int(raw.strip())
            if len(buf) < pos + n:
                return 0
            pos += n
        elif b"\r\ntransfer-encoding: chunked" in head:
            while True:
                le = buf.find(b"\r\n", pos)
                if le < 0:
                    return 0
                size = int(buf[pos:le].split(b";")[0], 16)
                if len(buf) < le + 2 + size + 2:
                    return 0
                pos = le + 2 + size + 2
                if size == 0:
                    break
        assert self._transport is not None
        if head.startswith(b"get /metrics"):
            target = buf[4 : head.find(b" ", 4)]
            self._transport.write(self._metrics.response(target))
        else:
            self._transport.write(self._answer)
        return pos


def _response(body: bytes, content_type: bytes) -> bytes:
    return (
        b"HTTP/1.1 200 OK\r\ncontent-type: "
        + content_type
        + b"\r\ncontent-length: "
        + str(len(body)).encode()
        + b"\r\n\r\n"
        + body
    )


class _Metrics:
    """The capture's response, and its ``/metrics/?name[]=`` variants (cached)."""

    def __init__(self, text: bytes) -> None:
        self._text = text.decode()
        self._filter = SampleFilter()
        self._cache: dict[bytes, bytes] = {}

    def response(self, target: bytes) -> bytes:
        got = self._cache.get(target)
        if got is None:
            path, _, query = target.decode("latin-1").partition("?")
            text = self._filter.serve(self._text, path, query)
            got = _response(text.encode(), b"text/plain; version=0.0.4")
            if len(self._cache) < 64:
                self._cache[target] = got
        return got


async def serve(ports: list[int], metrics_text: bytes) -> None:
    loop = asyncio.get_running_loop()
    metrics = _Metrics(metrics_text)
    for port in ports:
        answer = _response(
            b'{"served_by":"127.0.0.1:%d","choices":[{"text":"ok"}]}' % port, b"application/json"
        )
        await loop.create_server(
            functools.partial(_Http, answer, metrics),
            "127.0.0.1",
            port,
            reuse_address=True,
            backlog=1024,
        )
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    await asyncio.Event().wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ports", required=True, help="comma-separated ports")
    ap.add_argument("--metrics", type=Path, help="Prometheus text to serve on /metrics")
    args = ap.parse_args()
    ports = [int(p) for p in args.ports.split(",")]
    text = args.metrics.read_bytes() if args.metrics else b"# no metrics\n"
    try:
        import uvloop

        uvloop.run(serve(ports, text))
    except ImportError:
        asyncio.run(serve(ports, text))


if __name__ == "__main__":
    main()
