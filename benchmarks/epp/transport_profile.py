"""Per-request CPU of the EPP's ext_proc transport plus handler, in process.

``handler_profile.py`` measures ``StreamHandler.run`` alone; this adds what sits
above it in ``pdroute epp``: the HTTP/2 gRPC server (``epp.server.h2grpc``),
fed the bytes Envoy sends over its ext_proc connection, with no socket in between
(a fake transport takes the output), so the numbers are the Python cost alone.

Each stream is what Envoy sends for one HTTP request (``FULL_DUPLEX_STREAMED``
request body, response headers sent, no response body): HEADERS (HPACK with one
connection-wide encoder, as Envoy's), a DATA frame with the request-headers
message, one with the body message; then, once the EPP answered, one with the
response-headers message and an empty DATA with END_STREAM. Streams arrive in
batches of ``--batch`` (one ``data_received`` per batch and phase, as under load),
and the event loop runs until every stream of the batch has its answers.

Scenarios: ``floor`` (a director returning a constant decision: transport +
handler only) and ``small`` (the built-in default scheduling config, 16
endpoints, ~150-byte completion bodies). Reported: CPU microseconds per request
(median of interleaved rounds), as JSON and a table; ``--profile`` adds a
cProfile top-25 by tottime.

    .venv/bin/python benchmarks/epp/transport_profile.py [--requests 4000] [--batch 16]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import os
import pstats
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import hpack
import orjson

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from handler_profile import (  # type: ignore[import-not-found]  # noqa: E402  # this script's folder
    _ConstDirector,
    body_msg,
    build_parts,
    make_bodies,
    refresh_metrics,
    request_headers_msg,
    response_headers_msg,
)

from epp.handlers import StreamHandler  # noqa: E402
from epp.server import h2grpc  # noqa: E402
from epp.server.extproc import PROCESS_PATH, parse_request  # noqa: E402

_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


class _SinkTransport:
    """What the connection writes goes nowhere (counted)."""

    def __init__(self) -> None:
        self.bytes_out = 0
        self.writes = 0

    def write(self, data: bytes) -> None:
        self.bytes_out += len(data)
        self.writes += 1

    def get_write_buffer_size(self) -> int:
        return 0

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        return None

    def abort(self) -> None:
        return None


def _frame(ftype: int, flags: int, sid: int, payload: bytes) -> bytes:
    return h2grpc.frame(ftype, flags, sid, payload)


def _grpc(msg: Any) -> bytes:
    data = msg.SerializeToString()
    return b"\x00" + len(data).to_bytes(4, "big") + data


class Envoy:
    """Envoy's side of one ext_proc connection, as bytes."""

    def __init__(self) -> None:
        self.enc = hpack.Encoder()
        self.sid = 1
        self.steady: bytes | None = None

    def preface(self) -> bytes:
        # Large stream windows, as Envoy's (its default initial stream window is 256 MiB).
        settings = (4).to_bytes(2, "big") + (1 << 28).to_bytes(4, "big")
        return _PREFACE + _frame(h2grpc.SETTINGS, 0, 0, settings)

    def window_update(self, conn: Any) -> bytes:
        """Give the connection-level send window back (Envoy reads all we send)."""
        grow = (1 << 30) - conn.send_window
        return _frame(h2grpc.WINDOW_UPDATE, 0, 0, grow.to_bytes(4, "big")) if grow > 0 else b""

    def open(self, request: tuple[bytes, bytes]) -> tuple[int, bytes]:
        """A new stream: HEADERS plus the two request messages (pre-serialized)."""
        sid = self.sid
        self.sid += 2
        out = _frame(h2grpc.HEADERS, h2grpc.END_HEADERS, sid, self.header_block())
        out += _frame(h2grpc.DATA, 0, sid, request[0])
        out += _frame(h2grpc.DATA, 0, sid, request[1])
        return sid, out

    def header_block(self) -> bytes:
        """The gRPC request headers Envoy sends. After the first stream every field
        is in HPACK's dynamic table, so the block is the same for every stream:
        encode it twice, then reuse it (the harness's own cost stays out)."""
        if self.steady is None:
            fields = [
                (":method", "POST"),
                (":scheme", "http"),
                (":path", PROCESS_PATH),
                (":authority", "epp"),
                ("content-type", "application/grpc"),
                ("te", "trailers"),
                ("grpc-timeout", "10000m"),
                ("x-envoy-internal", "true"),
                ("x-forwarded-for", "10.0.0.1"),
                ("x-envoy-expected-rq-timeout-ms", "10000"),
            ]
            first = self.enc.encode(fields)
            self.steady = self.enc.encode(fields)
            return first
        return self.steady

    def close(self, sid: int, response: bytes) -> bytes:
        return _frame(h2grpc.DATA, 0, sid, response) + _frame(
            h2grpc.DATA, h2grpc.END_STREAM, sid, b""
        )


class Scenario:
    def __init__(self, name: str, batch: int) -> None:
        self.name = name
        self.batch = batch
        self.rng = random.Random(1)
        with tempfile.TemporaryDirectory(prefix="pdroute-transport-profile-") as tmp:
            parts = build_parts(tmp)
        self.datastore = parts["datastore"]
        handler: StreamHandler = parts["handler"]
        keys = [e.key for e in self.datastore.endpoints()]
        if name == "floor":
            handler = StreamHandler(_ConstDirector(keys[0]))
        refresh_metrics(self.datastore, self.rng)
        path, bodies = make_bodies("small", self.rng, 256)
        # Envoy's messages, serialized once: their encoding is Envoy's cost.
        self.requests = [
            (_grpc(request_headers_msg(path, len(b), f"req-{i:08d}")), _grpc(body_msg(b)))
            for i, b in enumerate(bodies)
        ]
        self.responses = {k: _grpc(response_headers_msg(k)) for k in keys}
        self.served = keys[0]
        server = h2grpc.GrpcServer()

        async def process(stream: h2grpc.ServerStream) -> None:
            await handler.run(stream.read, stream.write, h2grpc.EOF)

        server.add_method(PROCESS_PATH, parse_request, process)
        self.server = server
        self.conn: Any = None
        self.envoy = Envoy()
        self.transport = _SinkTransport()
        self.i = 0
        self.round_us: list[float] = []
        self.prof = cProfile.Profile()

    async def start(self) -> None:
        self.conn = h2grpc._Connection(self.server)
        self.conn.connection_made(self.transport)
        self.conn.data_received(self.envoy.preface())
        await self._settle()

    async def _settle(self) -> None:
        for _ in range(8):
            await asyncio.sleep(0)

    async def one_batch(self) -> None:
        conn, envoy = self.conn, self.envoy
        opened = []
        data = []
        for _ in range(self.batch):
            request = self.requests[self.i % len(self.requests)]
            self.i += 1
            sid, raw = envoy.open(request)
            opened.append(sid)
            data.append(raw)
        conn.data_received(b"".join(data))
        streams = conn.streams
        for _ in range(1000):  # until every stream has its routing answer
            await asyncio.sleep(0)
            if all(streams[sid].headers_sent for sid in opened):
                break
        # Response headers name one served endpoint (the same for all: only the
        # transport and handler cost is of interest here, the pick was made).
        resp = self.responses[self.served]
        conn.data_received(
            envoy.window_update(conn) + b"".join(envoy.close(sid, resp) for sid in opened)
        )
        for _ in range(1000):
            await asyncio.sleep(0)
            if not streams:
                break
        if streams:
            raise RuntimeError(f"{len(conn.streams)} streams still open after a batch")

    async def round(self, n_batches: int, profile: bool) -> None:
        gc.collect()
        if profile:
            self.prof.enable()
        c0 = time.process_time()
        for _ in range(n_batches):
            if self.i % 256 == 0:
                refresh_metrics(self.datastore, self.rng)
            await self.one_batch()
        used = time.process_time() - c0
        if profile:
            self.prof.disable()
        self.round_us.append(used / (n_batches * self.batch) * 1e6)


async def amain(args: argparse.Namespace) -> dict[str, Any]:
    scenarios = [Scenario(n, args.batch) for n in args.scenario]
    for s in scenarios:
        await s.start()
        for _ in range(max(1, 512 // args.batch)):
            await s.one_batch()  # warm caches, the prefix index, metric children
    rounds = 12
    per_round = max(1, args.requests // (rounds * args.batch))
    for _ in range(rounds):
        for s in scenarios:
            await s.round(per_round, args.profile)
    out: dict[str, Any] = {
        "batch": args.batch,
        "requests_per_scenario": rounds * per_round * args.batch,
        "scenarios": [],
    }
    for s in scenarios:
        out["scenarios"].append(
            {
                "scenario": s.name,
                "cpu_us_per_request": round(statistics.median(s.round_us), 1),
                "min_round_us": round(min(s.round_us), 1),
                "writes_per_request": round(s.transport.writes / max(s.i, 1), 2),
            }
        )
        if args.profile:
            print(f"== cProfile ({s.name}), top 25 by tottime ==", file=sys.stderr)
            pstats.Stats(s.prof, stream=sys.stderr).sort_stats("tottime").print_stats(25)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=4000)
    ap.add_argument("--batch", type=int, default=16, help="streams per data_received")
    ap.add_argument("--scenario", action="append", choices=("floor", "small"), help="default: both")
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    args.scenario = args.scenario or ["floor", "small"]
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    result = asyncio.run(amain(args))
    print(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())
    print(f"\nbatch {result['batch']}, load average {os.getloadavg()[0]:.2f}")
    print(f"{'scenario':<10} {'CPU us/req':>11} {'min round':>10} {'writes/req':>11}")
    for r in result["scenarios"]:
        print(
            f"{r['scenario']:<10} {r['cpu_us_per_request']:>11} {r['min_round_us']:>10} "
            f"{r['writes_per_request']:>11}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
