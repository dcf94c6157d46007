"""The EPP's HTTP/2 gRPC server, frame by frame.

A raw HTTP/2 client (hpack + struct) drives :class:`epp.server.h2grpc.GrpcServer`
through what a gRPC client (Envoy) may send: interop with a real gRPC client is
covered by tests/unit/handlers/test_epp_server.py and the Envoy suites; here are the
edges: flow control in both directions, CONTINUATION, padding, resets, limits and
protocol errors.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator
from typing import Any

import hpack
import pytest
from grpc_health.v1 import health_pb2

from epp.server import h2grpc
from epp.server.h2grpc import (
    CONTINUATION,
    DATA,
    END_HEADERS,
    END_STREAM,
    GOAWAY,
    HEADERS,
    PADDED,
    PING,
    RST_STREAM,
    SETTINGS,
    WINDOW_UPDATE,
    frame,
)

ECHO = "/test.Echo/Echo"
FAIL = "/test.Echo/Fail"
SLOW = "/test.Echo/Slow"
ONE = "/test.Echo/One"
Msg = health_pb2.HealthCheckRequest  # any small protobuf message with one string
TIMEOUT = 2.0


def grpc_msg(text: str) -> bytes:
    data = bytes(Msg(service=text).SerializeToString())
    return struct.pack(">BI", 0, len(data)) + data


class Client:
    """A minimal HTTP/2 client speaking raw frames."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.r = reader
        self.w = writer
        self.enc = hpack.Encoder()
        self.dec = hpack.Decoder()
        self.sid = -1

    async def handshake(self, settings: bytes = b"") -> None:
        self.w.write(h2grpc.PREFACE + frame(SETTINGS, 0, 0, settings))
        await self.w.drain()

    def headers_block(self, path: str, content_type: str = "application/grpc") -> bytes:
        return bytes(
            self.enc.encode(
                [
                    (":method", "POST"),
                    (":scheme", "http"),
                    (":path", path),
                    (":authority", "epp"),
                    ("content-type", content_type),
                    ("te", "trailers"),
                ]
            )
        )

    def open(self, path: str, *, end: bool = False, content_type: str = "application/grpc") -> int:
        self.sid += 2
        flags = END_HEADERS | (END_STREAM if end else 0)
        self.w.write(frame(HEADERS, flags, self.sid, self.headers_block(path, content_type)))
        return self.sid

    def send(self, sid: int, payload: bytes, *, end: bool = False, flags: int = 0) -> None:
        self.w.write(frame(DATA, flags | (END_STREAM if end else 0), sid, payload))

    async def frame(self) -> tuple[int, int, int, bytes]:
        head = await asyncio.wait_for(self.r.readexactly(9), TIMEOUT)
        hi, lo, ftype, flags, sid = struct.unpack(">BHBBI", head)
        payload = await asyncio.wait_for(self.r.readexactly((hi << 16) | lo), TIMEOUT)
        return ftype, flags, sid & 0x7FFFFFFF, payload

    async def next(self) -> tuple[int, int, int, bytes]:
        """The next frame; the server's SETTINGS are acked on the way."""
        t, flags, s, payload = await self.frame()
        if t == SETTINGS and not flags & 1:
            self.w.write(frame(SETTINGS, 1, 0))
        return t, flags, s, payload

    async def until(self, ftype: int, sid: int | None = None) -> tuple[int, bytes]:
        """Skip to the next frame of ``ftype`` (on ``sid``)."""
        while True:
            t, flags, s, payload = await self.next()
            if t == ftype and (sid is None or s == sid):
                return flags, payload

    async def response(self, sid: int) -> tuple[list[str], dict[str, str]]:
        """Messages and trailers of stream ``sid`` (other streams' frames skipped)."""
        messages: list[str] = []
        buf = b""
        while True:
            t, flags, s, payload = await self.next()
            if s != sid:
                continue
            if t == DATA:
                buf += payload
                if payload:  # give the window back, like a real client
                    inc = struct.pack(">I", len(payload))
                    self.w.write(
                        frame(WINDOW_UPDATE, 0, 0, inc) + frame(WINDOW_UPDATE, 0, sid, inc)
                    )
                while len(buf) >= 5:
                    _, n = struct.unpack(">BI", buf[:5])
                    if len(buf) < 5 + n:
                        break
                    messages.append(Msg.FromString(buf[5 : 5 + n]).service)
                    buf = buf[5 + n :]
            elif t == HEADERS:
                fields = {str(k): str(v) for k, v in self.dec.decode(payload)}
                if flags & END_STREAM:
                    return messages, fields
            elif t == RST_STREAM:
                raise AssertionError(f"stream reset: {struct.unpack('>I', payload)[0]}")


@pytest.fixture
async def server() -> AsyncIterator[tuple[h2grpc.GrpcServer, int, dict[str, Any]]]:
    events: dict[str, Any] = {"finally": 0, "started": asyncio.Event()}

    async def echo(stream: h2grpc.ServerStream) -> None:
        while (m := await stream.read()) is not h2grpc.EOF:
            await stream.write(Msg(service=m.service.upper()))

    async def one(stream: h2grpc.ServerStream) -> None:
        # Answers one message and returns without waiting for the half-close.
        m = await stream.read()
        await stream.write(Msg(service=m.service.upper()))

    async def fail(stream: h2grpc.ServerStream) -> None:
        await stream.read()
        raise RuntimeError("boom")

    async def slow(stream: h2grpc.ServerStream) -> None:
        events["started"].set()
        try:
            await asyncio.sleep(30)
        finally:
            events["finally"] += 1

    srv = h2grpc.GrpcServer(max_message_bytes=256 * 1024, max_concurrent_streams=8)
    srv.add_method(ECHO, Msg.FromString, echo)
    srv.add_method(FAIL, Msg.FromString, fail)
    srv.add_method(ONE, Msg.FromString, one)
    srv.add_method(SLOW, Msg.FromString, slow)
    port = await srv.listen("127.0.0.1", 0)
    yield srv, port, events
    await srv.stop(0)


async def connect(port: int, settings: bytes = b"") -> Client:
    r, w = await asyncio.open_connection("127.0.0.1", port)
    c = Client(r, w)
    await c.handshake(settings)
    return c


async def test_bidi_echo_with_trailers(server: Any) -> None:
    _, port, _ = server
    c = await connect(port)
    sid = c.open(ECHO)
    c.send(sid, grpc_msg("a") + grpc_msg("b"))
    c.send(sid, grpc_msg("c"), end=True)
    msgs, trailers = await c.response(sid)
    assert msgs == ["A", "B", "C"]
    assert trailers["grpc-status"] == "0"


async def test_handler_done_before_the_half_close_ends_with_trailers_only(
    server: Any,
) -> None:
    """A handler that knows nothing more is due (the EPP after the response
    headers) ends the call at once: answer and trailers in one go, no RST_STREAM
    (the peer closes its side when it likes), and late input is dropped."""
    srv, port, _ = server
    c = await connect(port)
    sid = c.open(ONE)
    c.send(sid, grpc_msg("x"))
    msgs, trailers = await c.response(sid)  # raises on RST_STREAM
    assert msgs == ["X"] and trailers["grpc-status"] == "0"
    c.send(sid, grpc_msg("late"), end=True)  # after the trailers: ignored
    sid2 = c.open(ECHO)
    c.send(sid2, grpc_msg("next"), end=True)
    msgs, _ = await c.response(sid2)  # the connection still works, nothing reset
    assert msgs == ["NEXT"]
    assert srv.streams() == 0


async def test_message_split_across_frames_and_padding(server: Any) -> None:
    _, port, _ = server
    c = await connect(port)
    sid = c.open(ECHO)
    m = grpc_msg("split")
    c.send(sid, m[:3])
    c.send(sid, bytes([4]) + m[3:7] + b"\0" * 4, flags=PADDED)  # pad length 4
    c.send(sid, m[7:], end=True)
    msgs, trailers = await c.response(sid)
    assert msgs == ["SPLIT"] and trailers["grpc-status"] == "0"


async def test_continuation_frames(server: Any) -> None:
    _, port, _ = server
    c = await connect(port)
    block = c.headers_block(ECHO)
    c.sid += 2
    sid = c.sid
    c.w.write(frame(HEADERS, 0, sid, block[:4]))
    c.w.write(frame(CONTINUATION, 0, sid, block[4:8]))
    c.w.write(frame(CONTINUATION, END_HEADERS, sid, block[8:]))
    c.send(sid, grpc_msg("x"), end=True)
    msgs, _ = await c.response(sid)
    assert msgs == ["X"]


async def test_unknown_method_and_bad_content_type(server: Any) -> None:
    _, port, _ = server
    c = await connect(port)
    sid = c.open("/no.Such/Method", end=True)
    msgs, trailers = await c.response(sid)
    assert msgs == [] and trailers["grpc-status"] == str(h2grpc.UNIMPLEMENTED)
    assert trailers[":status"] == "200"  # trailers-only response
    sid = c.open(ECHO, end=True, content_type="application/json")
    _, trailers = await c.response(sid)
    assert trailers["grpc-status"] == str(h2grpc.UNKNOWN)


async def test_handler_failure_ends_only_its_stream(server: Any) -> None:
    _, port, _ = server
    c = await connect(port)
    ok = c.open(ECHO)
    bad = c.open(FAIL)
    c.send(bad, grpc_msg("x"), end=True)
    _, trailers = await c.response(bad)
    assert trailers["grpc-status"] == str(h2grpc.INTERNAL)
    c.send(ok, grpc_msg("still"), end=True)
    msgs, trailers = await c.response(ok)
    assert msgs == ["STILL"] and trailers["grpc-status"] == "0"


async def test_limits_oversize_and_compressed_messages(server: Any) -> None:
    _, port, _ = server
    c = await connect(port)
    sid = c.open(ECHO)
    c.send(sid, struct.pack(">BI", 0, 300 * 1024) + b"x" * 1000)
    _, trailers = await c.response(sid)
    assert trailers["grpc-status"] == str(h2grpc.RESOURCE_EXHAUSTED)
    sid = c.open(ECHO)
    c.send(sid, b"\x01" + grpc_msg("z")[1:], end=True)
    _, trailers = await c.response(sid)
    assert trailers["grpc-status"] == str(h2grpc.UNIMPLEMENTED)
    sid = c.open(ECHO)
    c.send(sid, struct.pack(">BI", 0, 3) + b"\xff\xff\xff", end=True)  # not protobuf
    _, trailers = await c.response(sid)
    assert trailers["grpc-status"] == str(h2grpc.INTERNAL)


async def test_peer_reset_cancels_the_handler(server: Any) -> None:
    srv, port, events = server
    c = await connect(port)
    sid = c.open(SLOW)
    await asyncio.wait_for(events["started"].wait(), 2)
    c.w.write(frame(RST_STREAM, 0, sid, struct.pack(">I", h2grpc.CANCEL)))
    for _ in range(100):
        if events["finally"]:
            break
        await asyncio.sleep(0.01)
    assert events["finally"] == 1
    assert srv.streams() == 0


async def test_connection_loss_cancels_handlers(server: Any) -> None:
    srv, port, events = server
    c = await connect(port)
    c.open(SLOW)
    await asyncio.wait_for(events["started"].wait(), 2)
    c.w.close()
    for _ in range(100):
        if events["finally"]:
            break
        await asyncio.sleep(0.01)
    assert events["finally"] == 1 and srv.streams() == 0


async def test_concurrent_stream_cap_refuses_extra_streams(server: Any) -> None:
    _, port, _ = server
    c = await connect(port)
    for _ in range(8):
        c.open(SLOW)
    extra = c.open(ECHO)
    _, payload = await c.until(RST_STREAM, extra)
    assert struct.unpack(">I", payload)[0] == h2grpc.REFUSED_STREAM


async def test_ping_is_acked(server: Any) -> None:
    _, port, _ = server
    c = await connect(port)
    c.w.write(frame(PING, 0, 0, b"12345678"))
    flags, payload = await c.until(PING)
    assert flags & 1 and payload == b"12345678"


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", h2grpc.PROTOCOL_ERROR),
        (h2grpc.PREFACE + frame(SETTINGS, 0, 0) + frame(DATA, 0, 1, b"x"), h2grpc.PROTOCOL_ERROR),
        (h2grpc.PREFACE + frame(SETTINGS, 0, 0, b"\0\0\0"), h2grpc.FRAME_SIZE_ERROR),
        (h2grpc.PREFACE + frame(HEADERS, END_HEADERS, 1, b"\xff\xff\xff\xff"), 9),
    ],
    ids=["http1", "data-on-idle-stream", "bad-settings", "hpack-garbage"],
)
async def test_protocol_errors_end_the_connection_with_goaway(
    server: Any, data: bytes, code: int
) -> None:
    srv, port, _ = server
    r, w = await asyncio.open_connection("127.0.0.1", port)
    c = Client(r, w)
    w.write(data)
    _, payload = await c.until(GOAWAY)
    assert struct.unpack(">I", payload[4:8])[0] == code
    assert await asyncio.wait_for(r.read(), 2) == b""  # then the server closes
    # The server still serves others.
    c2 = await connect(port)
    sid = c2.open(ECHO)
    c2.send(sid, grpc_msg("ok"), end=True)
    assert (await c2.response(sid))[0] == ["OK"]
    assert srv.streams() == 0


async def test_receive_window_reopens_only_as_the_handler_reads(server: Any) -> None:
    """A message larger than the stream window still arrives; windows are given back."""
    _, port, _ = server
    c = await connect(port)
    sid = c.open(ECHO)
    big = grpc_msg("y" * 200_000)  # < max_message_bytes, > 64 KiB (the default window)
    for i in range(0, len(big), 16384):
        c.send(sid, big[i : i + 16384])
    c.send(sid, b"", end=True)
    msgs, trailers = await c.response(sid)
    assert msgs == ["Y" * 200_000] and trailers["grpc-status"] == "0"


async def test_send_side_respects_the_peer_window(server: Any) -> None:
    """With a 10-byte initial window, output waits for WINDOW_UPDATE and stays in order."""
    _, port, _ = server
    c = await connect(port, struct.pack(">HI", h2grpc.S_INITIAL_WINDOW_SIZE, 10))
    sid = c.open(ECHO)
    c.send(sid, grpc_msg("abcdefghij") + grpc_msg("klm"), end=True)
    got = b""
    while True:
        t, flags, s, payload = await c.next()
        if s != sid:
            continue
        if t == DATA:
            assert len(payload) <= 10
            got += payload
            c.w.write(frame(WINDOW_UPDATE, 0, sid, struct.pack(">I", len(payload))))
        elif t == HEADERS and flags & END_STREAM:
            break
    assert got == grpc_msg("ABCDEFGHIJ") + grpc_msg("KLM")


async def test_graceful_stop_lets_running_streams_finish() -> None:
    release = asyncio.Event()

    async def wait_then_answer(stream: h2grpc.ServerStream) -> None:
        await release.wait()
        await stream.write(Msg(service="done"))

    srv = h2grpc.GrpcServer()
    srv.add_method(ECHO, Msg.FromString, wait_then_answer)
    port = await srv.listen("127.0.0.1", 0)
    c = await connect(port)
    sid = c.open(ECHO, end=True)
    await asyncio.sleep(0.05)
    stopping = asyncio.create_task(srv.stop(5))
    _, payload = await c.until(GOAWAY)
    assert struct.unpack(">I", payload[4:8])[0] == h2grpc.NO_ERROR
    refused = c.open(ECHO, end=True)  # after GOAWAY: refused
    _, payload = await c.until(RST_STREAM, refused)
    assert struct.unpack(">I", payload)[0] == h2grpc.REFUSED_STREAM
    release.set()
    msgs, trailers = await c.response(sid)
    assert msgs == ["done"] and trailers["grpc-status"] == "0"
    await asyncio.wait_for(stopping, 2)


async def test_repeated_header_blocks_follow_dynamic_table_changes(server: Any) -> None:
    """Identical header bytes are decoded once and reused, but only while the HPACK
    dynamic table they refer to is unchanged."""
    _, port, _ = server
    c = await connect(port)
    first = c.headers_block(ECHO)  # adds :path, :authority, content-type, te
    again = c.headers_block(ECHO)  # all indexed: refers to those entries
    assert again != first

    async def call(block: bytes) -> dict[str, str]:
        c.sid += 2
        c.w.write(frame(HEADERS, END_HEADERS, c.sid, block))
        c.send(c.sid, grpc_msg("q"), end=True)
        return (await c.response(c.sid))[1]

    assert (await call(first))["grpc-status"] == "0"
    assert (await call(again))["grpc-status"] == "0"
    assert (await call(again))["grpc-status"] == "0"  # from the cache
    # ":path: /test.Echo/Fail", literal with incremental indexing (static name 4):
    # it becomes entry 62 and shifts the others, so `again` now reads :path = Fail.
    path = FAIL.encode()
    add_fail = bytes([0x44, len(path)]) + path
    assert (await call(add_fail))["grpc-status"] == str(h2grpc.UNKNOWN)  # no content-type
    assert (await call(again))["grpc-status"] == str(h2grpc.INTERNAL)  # the Fail method


async def test_a_peer_that_never_reads_is_disconnected() -> None:
    """PINGs (or anything that makes the server answer) from a peer that does not
    read its socket must not pile up in the server: past the limit it aborts."""
    import socket

    srv = h2grpc.GrpcServer(max_unsent_bytes=256 * 1024)
    port = await srv.listen("127.0.0.1", 0)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.setblocking(False)
    _r, w = await asyncio.open_connection(sock=sock)
    w.write(h2grpc.PREFACE + frame(SETTINGS, 0, 0))
    await w.drain()
    for _ in range(100):
        if srv.connections:
            break
        await asyncio.sleep(0.01)
    # Small kernel buffers on both sides, so unsent output reaches the server's own.
    (conn,) = srv.connections
    assert conn.transport is not None
    conn.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    ping = frame(PING, 0, 0, b"12345678")
    closed = False
    for _ in range(100):  # up to 100 x 1000 PINGs; never read
        try:
            w.write(ping * 1000)
            await asyncio.wait_for(w.drain(), 0.5)
        except (ConnectionError, TimeoutError):
            closed = True
            break
        await asyncio.sleep(0)
        if not srv.connections:
            closed = True
            break
    assert closed and not srv.connections
    w.close()
    await srv.stop(0)


class _SinkTransport:
    def __init__(self) -> None:
        self.chunks: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.chunks.append(data)

    def get_write_buffer_size(self) -> int:
        return 0

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        return None


@pytest.mark.parametrize(("write_through", "written_at_once"), [(2, True), (0, False)])
async def test_write_through_when_few_streams_are_open(
    write_through: int, written_at_once: bool
) -> None:
    """With few calls in progress a message is written at once (latency: Envoy
    holds a client's response for it); otherwise at the end of the loop pass, so
    many streams' answers share one write under load."""
    transport = _SinkTransport()
    seen: list[int] = []

    async def answer(stream: h2grpc.ServerStream) -> None:
        m = await stream.read()
        before = len(transport.chunks)
        await stream.write(Msg(service=m.service.upper()))
        seen.append(len(transport.chunks) - before)

    srv = h2grpc.GrpcServer(write_through_streams=write_through)
    srv.add_method(ECHO, Msg.FromString, answer)
    conn = h2grpc._Connection(srv)
    conn.connection_made(transport)  # type: ignore[arg-type]
    client = Client(None, None)  # type: ignore[arg-type]  # only its HPACK encoder
    conn.data_received(
        h2grpc.PREFACE
        + frame(SETTINGS, 0, 0, b"")
        + frame(HEADERS, END_HEADERS, 1, client.headers_block(ECHO))
        + frame(DATA, 0, 1, grpc_msg("hi"))
    )
    for _ in range(20):
        await asyncio.sleep(0)
    assert seen == [1 if written_at_once else 0]
    assert b"HI" in b"".join(transport.chunks)
