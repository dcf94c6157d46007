"""A small HTTP/2 gRPC server on asyncio, built for the ext_proc hop.

Why not grpc.aio: its C core runs I/O on its own poller thread and hands every
completion to the event loop through a cross-thread wake-up, which costs about
1 ms of CPU per ext_proc request (4-6 messages) on this project's 2-core
reference machine: more than all of the EPP's routing work. This server parses
HTTP/2 frames straight from an :class:`asyncio.Protocol` on the event loop, so a
request costs a few dozen microseconds of framing (see
``benchmarks/epp/envoy_overhead.py --transport``). grpc.aio stays available
(``pdroute epp --ext-proc-transport grpcio``).

Scope: what a gRPC server needs and nothing more: h2c (prior knowledge) or TLS
with ALPN ``h2``; bidirectional and unary methods by path; identity encoding
only (messages flagged compressed get ``UNIMPLEMENTED``); no server push, no
priorities, no dynamic-table compression of what we send (our header blocks are
a few fixed bytes, so the encoder keeps no state).

Invariants:

* Memory is bounded: a stream's unread input never exceeds its receive window
  (``stream_window`` bytes), because the window is only re-opened when the
  handler *reads* a message; streams are capped at ``max_concurrent_streams``;
  one message is capped at ``max_message_bytes``; a header block at
  :data:`MAX_HEADER_BLOCK`. Output waiting on the peer's flow-control window
  blocks the writing handler (``await write``), so it cannot pile up either.
* Protocol errors on the connection (bad preface, frame size, flow-control
  overrun, HPACK errors) end that connection with GOAWAY; errors on one stream
  end that stream (trailers or RST_STREAM). Nothing a peer sends raises out of
  :meth:`_Connection.data_received`, and one stream's handler failing ends only
  that stream with ``INTERNAL``.
* A stream reset by the peer, or a connection lost, cancels the handler task,
  like grpc.aio does, so ``finally`` blocks in handlers release state at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import struct
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, cast

import hpack
import hpack.exceptions

log = logging.getLogger(__name__)

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# Frame types (RFC 9113 §6).
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY = range(8)
WINDOW_UPDATE, CONTINUATION = 8, 9
# Flags.
END_STREAM = 0x1
ACK = 0x1
END_HEADERS = 0x4
PADDED = 0x8
PRIORITY_FLAG = 0x20
# Error codes (RFC 9113 §7).
NO_ERROR, PROTOCOL_ERROR, INTERNAL_ERROR, FLOW_CONTROL_ERROR = 0, 1, 2, 3
STREAM_CLOSED, FRAME_SIZE_ERROR, REFUSED_STREAM, CANCEL = 5, 6, 7, 8
COMPRESSION_ERROR = 9
ENHANCE_YOUR_CALM = 0xB
# Settings.
S_HEADER_TABLE_SIZE, S_ENABLE_PUSH, S_MAX_CONCURRENT_STREAMS = 1, 2, 3
S_INITIAL_WINDOW_SIZE, S_MAX_FRAME_SIZE, S_MAX_HEADER_LIST_SIZE = 4, 5, 6

# gRPC status codes.
OK, CANCELLED, UNKNOWN, INVALID_ARGUMENT, NOT_FOUND = 0, 1, 2, 3, 5
RESOURCE_EXHAUSTED, UNIMPLEMENTED, INTERNAL, UNAVAILABLE = 8, 12, 13, 14

MAX_WINDOW = 2**31 - 1
DEFAULT_WINDOW = 65_535
MIN_FRAME = 16_384
#: Largest frame we accept; the peer may send DATA frames this big.
OUR_MAX_FRAME = 1 << 20
#: Largest header block (HEADERS + CONTINUATION) accepted, encoded.
MAX_HEADER_BLOCK = 64 * 1024
#: Output the transport may hold unsent before the connection is given up.
MAX_UNSENT = 64 * 1024 * 1024
#: Distinct repeated header blocks remembered per connection (see _decode_headers).
HEADER_CACHE_SIZE = 16

_FRAME = struct.Struct(">BHBBI")  # length (24 bits as 8+16), type, flags, stream id
_U32 = struct.Struct(">I")
_SETTING = struct.Struct(">HI")
_GRPC_PREFIX = struct.Struct(">BI")  # compressed flag, message length


def frame(ftype: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    n = len(payload)
    return _FRAME.pack(n >> 16, n & 0xFFFF, ftype, flags, sid) + payload


def _hpack_int(value: int, prefix_bits: int, first: int) -> bytes:
    """HPACK integer (RFC 7541 §5.1) with ``first``'s high bits set."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([first | value])
    out = bytearray([first | limit])
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _literal(name: bytes, value: bytes) -> bytes:
    """A literal header field without indexing, new name, no Huffman (§6.2.2)."""
    return b"\x00" + _hpack_int(len(name), 7, 0) + name + _hpack_int(len(value), 7, 0) + value


# ":status: 200" is static entry 8; "content-type" is static name 31.
_RESPONSE_HEADERS = b"\x88" + b"\x0f\x10" + _hpack_int(16, 7, 0) + b"application/grpc"
_PERCENT_SAFE = frozenset(range(0x20, 0x7F)) - {0x25}


def _grpc_message(text: str) -> bytes:
    """Percent-encode ``grpc-message`` as the gRPC HTTP/2 spec asks."""
    out = bytearray()
    for b in text.encode("utf-8", "replace"):
        if b in _PERCENT_SAFE:
            out.append(b)
        else:
            out += b"%%%02X" % b
    return bytes(out)


def _trailers_block(status: int, message: str) -> bytes:
    block = _literal(b"grpc-status", str(status).encode())
    if message:
        block += _literal(b"grpc-message", _grpc_message(message))
    return block


class GrpcAbort(Exception):
    """Raised by a method handler to end its stream with a gRPC status."""

    def __init__(self, code: int, message: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class _ConnectionError(Exception):
    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code


class StreamClosed(Exception):
    """Writing to a stream that has ended (reset by the peer, connection gone)."""


class Message(Protocol):
    def SerializeToString(self) -> bytes: ...  # noqa: N802 - protobuf's name


#: The end-of-input marker ``ServerStream.read`` returns.
EOF: Any = object()

Deserializer = Callable[[bytes], Any]
MethodHandler = Callable[["ServerStream"], Awaitable[None]]


class ServerStream:
    """One gRPC call as its handler sees it: ``read()`` the next request message
    (or :data:`EOF`), ``write(message)`` a response message. Trailers are sent when
    the handler returns (``OK``) or raises :class:`GrpcAbort` (its code)."""

    __slots__ = (
        "_conn",
        "_deserialize",
        "_drained",
        "_inbox",
        "_waiter",
        "ended_local",
        "ended_remote",
        "headers_sent",
        "partial",
        "pending",
        "recv_window",
        "send_window",
        "sid",
        "skip_input",
        "task",
        "unacked",
    )

    def __init__(
        self, conn: _Connection, sid: int, deserialize: Deserializer, send_window: int
    ) -> None:
        self._conn = conn
        self._deserialize = deserialize
        self.sid = sid
        self._inbox: deque[tuple[Any, int]] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._drained: asyncio.Future[None] | None = None
        self.ended_remote = False  # the peer sent END_STREAM
        self.ended_local = False  # we sent trailers or RST_STREAM
        self.headers_sent = False
        self.skip_input = False  # input after an error on this stream is dropped
        self.partial = bytearray()  # an incomplete gRPC message
        self.pending: deque[tuple[bytes, bool]] = deque()  # (frames-to-be, is-data)
        self.recv_window = conn.stream_window
        self.send_window = send_window
        self.unacked = 0
        self.task: asyncio.Task[None] | None = None

    async def read(self) -> Any:
        while True:
            inbox = self._inbox
            if inbox:
                msg, size = inbox.popleft()
                self._conn.consumed(self, size)
                return msg
            if self.ended_remote or self.ended_local:
                return EOF
            fut = self._conn.loop.create_future()
            self._waiter = fut
            try:
                await fut
            finally:
                self._waiter = None

    async def write(self, message: Message) -> None:
        if self.ended_local:
            raise StreamClosed(f"stream {self.sid} has ended")
        conn = self._conn
        quiet = conn.quiet()
        conn.send_message(self, message.SerializeToString())
        if quiet:
            conn.flush()
        if self.pending or conn.paused:
            await self._wait_drained()

    async def _wait_drained(self) -> None:
        while (self.pending or self._conn.paused) and not self.ended_local:
            fut = self._conn.loop.create_future()
            self._drained = fut
            try:
                await fut
            finally:
                self._drained = None

    # -- called by the connection ------------------------------------------------

    def deliver(self, payload: bytes | memoryview, size: int) -> None:
        self._inbox.append((self._deserialize(bytes(payload)), size))
        self.wake()

    def wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def wake_writer(self) -> None:
        d = self._drained
        if d is not None and not d.done():
            d.set_result(None)


class _Method:
    __slots__ = ("deserialize", "handler")

    def __init__(self, deserialize: Deserializer, handler: MethodHandler) -> None:
        self.deserialize = deserialize
        self.handler = handler


class _Connection(asyncio.Protocol):
    """One HTTP/2 connection: frame parsing, flow control, stream table."""

    def __init__(self, server: GrpcServer) -> None:
        self.server = server
        self.loop = asyncio.get_running_loop()
        self.stream_window = server.stream_window
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.preface_ok = False
        self.decoder = hpack.Decoder(max_header_list_size=MAX_HEADER_BLOCK)
        self.hcache: dict[
            bytes, tuple[tuple[object, int, int, int], list[tuple[bytes, bytes]]]
        ] = {}
        self.streams: dict[int, ServerStream] = {}
        self.last_sid = 0
        self.goaway_sent = False
        self.closed = False
        self.paused = False
        # Peer settings that bind what we send.
        self.peer_initial_window = DEFAULT_WINDOW
        self.peer_max_frame = MIN_FRAME
        self.send_window = DEFAULT_WINDOW  # connection-level, toward the peer
        # Our receive side (connection level).
        self.recv_window = server.connection_window
        self.unacked = 0
        # A header block being continued: (stream id, end_stream, fragments).
        self.continuing: tuple[int, bool, bytearray] | None = None
        self.out: list[bytes] = []
        self.flush_scheduled = False
        self.blocked: dict[int, ServerStream] = {}  # streams with pending output

    # -- asyncio.Protocol ----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):  # small answers must not wait for Nagle
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.server.connections.add(self)
        settings = b"".join(
            _SETTING.pack(k, v)
            for k, v in (
                (S_MAX_CONCURRENT_STREAMS, self.server.max_concurrent_streams),
                (S_INITIAL_WINDOW_SIZE, self.stream_window),
                (S_MAX_FRAME_SIZE, OUR_MAX_FRAME),
                (S_MAX_HEADER_LIST_SIZE, MAX_HEADER_BLOCK),
                (S_ENABLE_PUSH, 0),
            )
        )
        self.emit(frame(SETTINGS, 0, 0, settings))
        grow = self.recv_window - DEFAULT_WINDOW
        if grow > 0:
            self.emit(frame(WINDOW_UPDATE, 0, 0, _U32.pack(grow)))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.server.connections.discard(self)
        for s in list(self.streams.values()):
            self._drop(s, cancel=True)
        self.blocked.clear()
        self.out.clear()

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        for s in list(self.streams.values()):
            s.wake_writer()

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        buf = self.buf
        buf += data
        try:
            if not self.preface_ok:
                if len(buf) < len(PREFACE):
                    if not PREFACE.startswith(bytes(buf)):
                        raise _ConnectionError(PROTOCOL_ERROR, "not an HTTP/2 client preface")
                    return
                if buf[: len(PREFACE)] != PREFACE:
                    raise _ConnectionError(PROTOCOL_ERROR, "not an HTTP/2 client preface")
                del buf[: len(PREFACE)]
                self.preface_ok = True
            pos = 0
            n = len(buf)
            while n - pos >= 9:
                hi, lo, ftype, flags, sid = _FRAME.unpack_from(buf, pos)
                length = (hi << 16) | lo
                if length > OUR_MAX_FRAME:
                    raise _ConnectionError(FRAME_SIZE_ERROR, f"frame of {length} bytes")
                end = pos + 9 + length
                if end > n:
                    break
                payload = memoryview(buf)[pos + 9 : end]
                try:
                    self._on_frame(ftype, flags, sid & 0x7FFFFFFF, payload)
                finally:
                    payload.release()
                pos = end
                if self.closed:
                    return
            if pos:
                del buf[:pos]
        except _ConnectionError as err:
            self._fail(err.code, str(err))
        except Exception:
            log.exception("HTTP/2 connection failed")
            self._fail(INTERNAL_ERROR, "internal error")
        self.flush()

    # -- output --------------------------------------------------------------------

    def emit(self, data: bytes) -> None:
        self.out.append(data)
        if not self.flush_scheduled:
            self.flush_scheduled = True
            self.loop.call_soon(self.flush)

    def quiet(self) -> bool:
        """Few calls in progress (``write_through_streams``): latency is what counts,
        so output is written at once instead of at the end of the loop pass (under
        load it stays batched per pass: one write for many streams)."""
        return len(self.streams) <= self.server.write_through_streams

    def flush(self) -> None:
        self.flush_scheduled = False
        out = self.out
        t = self.transport
        if out and t is not None and not self.closed:
            t.write(b"".join(out) if len(out) > 1 else out[0])
            out.clear()
            if t.get_write_buffer_size() > self.server.max_unsent_bytes:
                # A peer that sends (PINGs, SETTINGS) but does not read: handlers
                # already wait for drain, control frames must not pile up either.
                self._fail(ENHANCE_YOUR_CALM, "peer is not reading")
        out.clear()

    def _fail(self, code: int, reason: str) -> None:
        """End the connection: GOAWAY with ``code``, then close (abort when the peer
        is not reading: its unsent output would never drain)."""
        if self.closed:
            return
        self.closed = True  # first: nothing below may re-enter
        log.warning("closing HTTP/2 connection: %s", reason)
        goaway = frame(
            GOAWAY, 0, 0, _U32.pack(self.last_sid) + _U32.pack(code) + reason[:200].encode()
        )
        t = self.transport
        if t is not None:
            if code == ENHANCE_YOUR_CALM:
                t.abort()
            else:
                t.write(b"".join([*self.out, goaway]))
                t.close()
        self.out.clear()
        for s in list(self.streams.values()):
            self._drop(s, cancel=True)

    def goaway(self) -> None:
        """Refuse new streams (graceful shutdown); running ones go on."""
        if not self.goaway_sent and not self.closed:
            self.goaway_sent = True
            self.emit(frame(GOAWAY, 0, 0, _U32.pack(self.last_sid) + _U32.pack(NO_ERROR)))

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.flush()
            self.transport.close()

    # -- frames --------------------------------------------------------------------

    def _on_frame(self, ftype: int, flags: int, sid: int, payload: memoryview) -> None:
        if self.continuing is not None and ftype != CONTINUATION:
            raise _ConnectionError(PROTOCOL_ERROR, "expected CONTINUATION")
        if ftype == DATA:
            self._on_data(flags, sid, payload)
        elif ftype == HEADERS:
            self._on_headers(flags, sid, payload)
        elif ftype == CONTINUATION:
            self._on_continuation(flags, sid, payload)
        elif ftype == SETTINGS:
            self._on_settings(flags, sid, payload)
        elif ftype == WINDOW_UPDATE:
            self._on_window_update(sid, payload)
        elif ftype == PING:
            if sid != 0 or len(payload) != 8:
                raise _ConnectionError(PROTOCOL_ERROR, "bad PING")
            if not flags & ACK:
                self.emit(frame(PING, ACK, 0, bytes(payload)))
        elif ftype == RST_STREAM:
            if sid == 0 or len(payload) != 4:
                raise _ConnectionError(PROTOCOL_ERROR, "bad RST_STREAM")
            s = self.streams.get(sid)
            if s is not None:
                s.ended_local = True  # nothing more may be sent on it
                self._drop(s, cancel=True)
        elif ftype == GOAWAY:
            self.goaway()  # the peer opens no new streams; ours finish
        elif ftype == PRIORITY:
            if sid == 0:
                raise _ConnectionError(PROTOCOL_ERROR, "PRIORITY on stream 0")
        elif ftype == PUSH_PROMISE:
            raise _ConnectionError(PROTOCOL_ERROR, "PUSH_PROMISE from a client")
        # Unknown frame types are ignored (RFC 9113 §4.1).

    def _on_settings(self, flags: int, sid: int, payload: memoryview) -> None:
        if sid != 0:
            raise _ConnectionError(PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & ACK:
            if len(payload):
                raise _ConnectionError(FRAME_SIZE_ERROR, "SETTINGS ACK with a payload")
            return
        if len(payload) % 6:
            raise _ConnectionError(FRAME_SIZE_ERROR, "SETTINGS length")
        for i in range(0, len(payload), 6):
            key, value = _SETTING.unpack_from(payload, i)
            if key == S_INITIAL_WINDOW_SIZE:
                if value > MAX_WINDOW:
                    raise _ConnectionError(FLOW_CONTROL_ERROR, "initial window too large")
                delta = value - self.peer_initial_window
                self.peer_initial_window = value
                for s in self.streams.values():
                    s.send_window += delta
                    if s.send_window > MAX_WINDOW:
                        raise _ConnectionError(FLOW_CONTROL_ERROR, "stream window overflow")
            elif key == S_MAX_FRAME_SIZE:
                if not MIN_FRAME <= value <= 16_777_215:
                    raise _ConnectionError(PROTOCOL_ERROR, "bad max frame size")
                self.peer_max_frame = value
            elif key == S_ENABLE_PUSH and value > 1:
                raise _ConnectionError(PROTOCOL_ERROR, "bad enable_push")
        self.emit(frame(SETTINGS, ACK, 0))
        self._unblock()

    def _on_window_update(self, sid: int, payload: memoryview) -> None:
        if len(payload) != 4:
            raise _ConnectionError(FRAME_SIZE_ERROR, "WINDOW_UPDATE length")
        inc = _U32.unpack(payload)[0] & 0x7FFFFFFF
        if sid == 0:
            if inc == 0:
                raise _ConnectionError(PROTOCOL_ERROR, "zero window increment")
            self.send_window += inc
            if self.send_window > MAX_WINDOW:
                raise _ConnectionError(FLOW_CONTROL_ERROR, "connection window overflow")
            self._unblock()
            return
        s = self.streams.get(sid)
        if s is None:
            return  # a stream we already closed
        if inc == 0:
            self._reset(s, PROTOCOL_ERROR)
            return
        s.send_window += inc
        if s.send_window > MAX_WINDOW:
            self._reset(s, FLOW_CONTROL_ERROR)
            return
        if s.pending:
            self._send_pending(s)

    def _on_headers(self, flags: int, sid: int, payload: memoryview) -> None:
        if sid == 0 or not sid & 1:
            raise _ConnectionError(PROTOCOL_ERROR, f"HEADERS on stream {sid}")
        block = payload
        if flags & PADDED:
            pad = block[0] if len(block) else 0
            if pad >= len(block):
                raise _ConnectionError(PROTOCOL_ERROR, "padding exceeds the frame")
            block = block[1 : len(block) - pad]
        if flags & PRIORITY_FLAG:
            if len(block) < 5:
                raise _ConnectionError(FRAME_SIZE_ERROR, "short PRIORITY fields")
            block = block[5:]
        if not flags & END_HEADERS:
            self.continuing = (sid, bool(flags & END_STREAM), bytearray(block))
            return
        self._on_header_block(sid, bool(flags & END_STREAM), block)

    def _on_continuation(self, flags: int, sid: int, payload: memoryview) -> None:
        cont = self.continuing
        if cont is None or cont[0] != sid:
            raise _ConnectionError(PROTOCOL_ERROR, "unexpected CONTINUATION")
        cont[2].extend(payload)
        if len(cont[2]) > MAX_HEADER_BLOCK:
            raise _ConnectionError(COMPRESSION_ERROR, "header block too large")
        if flags & END_HEADERS:
            self.continuing = None
            self._on_header_block(sid, cont[1], memoryview(cont[2]))

    def _on_header_block(self, sid: int, end_stream: bool, block: memoryview) -> None:
        fields = self._decode_headers(bytes(block))
        s = self.streams.get(sid)
        if s is not None:  # trailers from the client: only END_STREAM matters
            if end_stream:
                self._end_remote(s)
            return
        if sid <= self.last_sid:
            return  # headers for a stream we already closed: nothing to do
        self.last_sid = sid
        if self.goaway_sent or len(self.streams) >= self.server.max_concurrent_streams:
            self.emit(frame(RST_STREAM, 0, sid, _U32.pack(REFUSED_STREAM)))
            return
        path = b""
        content_type = b""
        for name, value in fields:
            if name == b":path":
                path = value
            elif name == b"content-type":
                content_type = value
        method = self.server.methods.get(path)
        stream = ServerStream(
            self, sid, method.deserialize if method else bytes, self.peer_initial_window
        )
        self.streams[sid] = stream
        if end_stream:
            stream.ended_remote = True
        if not content_type.startswith(b"application/grpc"):
            self._finish(stream, UNKNOWN, "content-type must be application/grpc")
            return
        if method is None:
            self._finish(stream, UNIMPLEMENTED, f"unknown method {path.decode('latin-1')}")
            return
        stream.task = self.loop.create_task(self._run(stream, method.handler))

    def _table_state(self) -> tuple[object, int, int, int]:
        t = self.decoder.header_table
        entries = t.dynamic_entries
        # The newest entry itself (not its id): holding it keeps its identity unique.
        return (entries[0] if entries else None, len(entries), t._current_size, t._maxsize)

    def _decode_headers(self, block: bytes) -> list[tuple[bytes, bytes]]:
        """HPACK-decode ``block``, reusing the result for a repeated block.

        Envoy sends the same few header bytes for every stream it opens. A block
        that did not change the dynamic table decodes to the same fields as long as
        the table is unchanged, so those results are cached with the table's state
        (newest entry, length, size, limit: every change alters one of them)."""
        hit = self.hcache.get(block)
        state = self._table_state()
        if hit is not None:
            cached_state, fields = hit
            if cached_state[0] is state[0] and cached_state[1:] == state[1:]:
                return fields
        try:
            fields = [(bytes(k), bytes(v)) for k, v in self.decoder.decode(block, raw=True)]
        except hpack.exceptions.HPACKError as err:
            raise _ConnectionError(COMPRESSION_ERROR, f"HPACK: {err}") from None
        after = self._table_state()
        if after[0] is state[0] and after[1:] == state[1:]:
            if len(self.hcache) >= HEADER_CACHE_SIZE:
                self.hcache.clear()
            self.hcache[block] = (state, fields)
        return fields

    async def _run(self, stream: ServerStream, handler: MethodHandler) -> None:
        code, message = OK, ""
        try:
            await handler(stream)
        except GrpcAbort as err:
            code, message = err.code, err.message
        except StreamClosed:
            return
        except asyncio.CancelledError:
            return  # reset by the peer or connection gone: nothing to answer
        except Exception:
            log.exception("gRPC handler failed on stream %d", stream.sid)
            code, message = INTERNAL, "internal error"
        if not stream.ended_local and not self.closed:
            quiet = self.quiet()
            self._finish(stream, code, message)
            if quiet:
                self.flush()

    def _on_data(self, flags: int, sid: int, payload: memoryview) -> None:
        size = len(payload)
        self.recv_window -= size
        if self.recv_window < 0:
            raise _ConnectionError(FLOW_CONTROL_ERROR, "connection receive window exceeded")
        s = self.streams.get(sid)
        if s is None or s.ended_remote:
            if sid == 0 or sid > self.last_sid:
                raise _ConnectionError(PROTOCOL_ERROR, f"DATA on idle stream {sid}")
            self._ack(size)  # a stream we closed: drop, but give the window back
            return
        s.recv_window -= size
        if s.recv_window < 0:
            self._ack(size)
            self._reset(s, FLOW_CONTROL_ERROR)
            return
        data = payload
        if flags & PADDED:
            pad = data[0] if size else 0
            if pad >= size:
                raise _ConnectionError(PROTOCOL_ERROR, "padding exceeds the frame")
            data = data[1 : size - pad]
            self._ack_stream(s, size - len(data))
        if s.skip_input:
            self._ack_stream(s, len(data))
        elif data:
            self._take_messages(s, data)
        if flags & END_STREAM:
            self._end_remote(s)

    def _take_messages(self, s: ServerStream, data: memoryview) -> None:
        """Split ``data`` into gRPC messages for ``s``'s handler.

        Flow control: a complete message re-opens the window when the handler
        reads it; the bytes of an incomplete one are acknowledged on arrival, so a
        message larger than the window can still arrive (bounded by
        ``max_message_bytes``)."""
        pre_acked = len(s.partial)  # the partial message's bytes, already acked
        if pre_acked:
            s.partial += data
            view = memoryview(s.partial)
        else:
            view = data
        pos = 0
        n = len(view)
        limit = self.server.max_message_bytes
        try:
            while n - pos >= 5:
                compressed, length = _GRPC_PREFIX.unpack_from(view, pos)
                if length > limit or compressed:
                    self._ack_stream(s, n - pos - pre_acked)
                    pos = n
                    s.skip_input = True
                    if compressed:
                        self._finish(s, UNIMPLEMENTED, "compressed messages are not supported")
                    else:
                        self._finish(
                            s,
                            RESOURCE_EXHAUSTED,
                            f"message of {length} bytes exceeds the limit of {limit}",
                        )
                    break
                start = pos + 5
                if n - start < length:
                    break
                pos = start + length
                try:
                    s.deliver(view[start:pos], length + 5 - pre_acked)
                except Exception:
                    self._ack_stream(s, n - start + 5 - pre_acked)
                    pos = n
                    s.skip_input = True
                    self._finish(s, INTERNAL, "could not parse the request message")
                    break
                pre_acked = 0
            rest = bytes(view[pos:]) if pos < n else b""
        finally:
            if view is not data:
                view.release()
        if rest:
            self._ack_stream(s, len(rest) - pre_acked)
            s.partial = bytearray(rest)
        elif s.partial:
            s.partial = bytearray()

    def _end_remote(self, s: ServerStream) -> None:
        s.ended_remote = True
        if s.partial:
            s.partial = bytearray()
        s.wake()
        if s.ended_local and not s.pending:
            self._drop(s, cancel=False)

    # -- flow control ----------------------------------------------------------------

    def consumed(self, s: ServerStream, size: int) -> None:
        """``size`` bytes of ``s``'s input were read by its handler: re-open windows."""
        self._ack_stream(s, size)

    def _ack(self, size: int) -> None:
        self.unacked += size
        if self.unacked >= self.server.connection_window // 2:
            self.emit(frame(WINDOW_UPDATE, 0, 0, _U32.pack(self.unacked)))
            self.recv_window += self.unacked
            self.unacked = 0

    def _ack_stream(self, s: ServerStream, size: int) -> None:
        if size <= 0:
            return
        self._ack(size)
        if s.ended_remote or s.ended_local:
            return
        s.unacked += size
        if s.unacked >= self.stream_window // 2:
            self.emit(frame(WINDOW_UPDATE, 0, s.sid, _U32.pack(s.unacked)))
            s.recv_window += s.unacked
            s.unacked = 0

    # -- sending -------------------------------------------------------------------

    def send_message(self, s: ServerStream, data: bytes) -> None:
        if not s.headers_sent:
            s.headers_sent = True
            self._queue(s, frame(HEADERS, END_HEADERS, s.sid, _RESPONSE_HEADERS), False)
        self._queue(s, _GRPC_PREFIX.pack(0, len(data)) + data, True)

    def _queue(self, s: ServerStream, item: bytes, is_data: bool) -> None:
        if s.pending:
            s.pending.append((item, is_data))
            return
        if not is_data:
            self.emit(item)
            return
        rest = self._send_data(s, item)
        if rest:
            s.pending.append((rest, True))
            self.blocked[s.sid] = s

    def _send_data(self, s: ServerStream, data: bytes) -> bytes:
        """Send as much of ``data`` as the windows allow; return the rest."""
        pos = 0
        n = len(data)
        sid = s.sid
        max_frame = self.peer_max_frame
        while pos < n:
            room = min(n - pos, max_frame, s.send_window, self.send_window)
            if room <= 0:
                return data[pos:]
            chunk = data[pos : pos + room] if (pos or room < n) else data
            self.emit(frame(DATA, 0, sid, chunk))
            s.send_window -= room
            self.send_window -= room
            pos += room
        return b""

    def _send_pending(self, s: ServerStream) -> None:
        pending = s.pending
        while pending:
            item, is_data = pending[0]
            if is_data:
                rest = self._send_data(s, item)
                if rest:
                    pending[0] = (rest, True)
                    return
            else:
                self.emit(item)
            pending.popleft()
        self.blocked.pop(s.sid, None)
        s.wake_writer()
        if s.ended_local:
            self._drop(s, cancel=False)  # the trailers went out: the stream is done

    def _unblock(self) -> None:
        for s in list(self.blocked.values()):
            if self.send_window <= 0:
                return
            self._send_pending(s)

    def _finish(self, s: ServerStream, code: int, message: str) -> None:
        """End ``s`` from our side with ``code``: trailers (after any pending data),
        then, for an error while the peer is still sending, RST_STREAM(NO_ERROR)."""
        if s.ended_local:
            return
        s.ended_local = True
        block = _trailers_block(code, message)
        if not s.headers_sent:
            s.headers_sent = True
            block = _RESPONSE_HEADERS + block  # trailers-only response
        self._queue(s, frame(HEADERS, END_HEADERS | END_STREAM, s.sid, block), False)
        if not s.ended_remote and code != OK:
            # An error ends the call: tell the peer to stop sending. A handler that
            # returned OK before the peer half-closed (it knows nothing more is
            # due) leaves the peer to close its side; late input is dropped.
            self._queue(s, frame(RST_STREAM, 0, s.sid, _U32.pack(NO_ERROR)), False)
        s.wake()
        s.wake_writer()
        if not s.pending:
            self._drop(s, cancel=False)

    def _reset(self, s: ServerStream, code: int) -> None:
        self.emit(frame(RST_STREAM, 0, s.sid, _U32.pack(code)))
        s.ended_local = True
        self._drop(s, cancel=True)

    def _drop(self, s: ServerStream, *, cancel: bool) -> None:
        """Forget ``s``; its unread input gives its connection window back."""
        if self.streams.pop(s.sid, None) is None:
            return
        self.blocked.pop(s.sid, None)
        s.pending.clear()
        leftover = sum(size for _, size in s._inbox)
        s._inbox.clear()
        if leftover and not self.closed:
            self._ack(leftover)
        s.wake()
        s.wake_writer()
        t = s.task
        if cancel and t is not None and not t.done():
            t.cancel()
        self.server.stream_dropped()


class GrpcServer:
    """Serves registered gRPC methods on one or more listening sockets."""

    def __init__(
        self,
        *,
        max_message_bytes: int = 17 * 1024 * 1024,
        max_concurrent_streams: int = 100_000,
        stream_window: int = 1 << 20,
        connection_window: int = 16 << 20,
        max_unsent_bytes: int = MAX_UNSENT,
        write_through_streams: int = 2,
    ) -> None:
        if not DEFAULT_WINDOW <= stream_window <= MAX_WINDOW:
            raise ValueError("stream_window out of range")
        if not DEFAULT_WINDOW <= connection_window <= MAX_WINDOW:
            raise ValueError("connection_window out of range")
        self.max_message_bytes = max_message_bytes
        self.max_concurrent_streams = max_concurrent_streams
        self.stream_window = stream_window
        self.connection_window = connection_window
        self.max_unsent_bytes = max_unsent_bytes
        #: With at most this many streams open on a connection, a handler's message
        #: is written at once (latency); above it, at the end of the loop pass.
        self.write_through_streams = write_through_streams
        self.methods: dict[bytes, _Method] = {}
        self.connections: set[_Connection] = set()
        self._servers: list[asyncio.Server] = []
        self._closed = asyncio.Event()
        self._idle: asyncio.Event | None = None  # set when the last stream ends (stop)

    def add_method(self, path: str, deserialize: Deserializer, handler: MethodHandler) -> None:
        """Serve ``path`` (``/package.Service/Method``); ``handler`` gets the stream."""
        self.methods[path.encode()] = _Method(deserialize, handler)

    async def listen(self, host: str, port: int, ssl_context: ssl.SSLContext | None = None) -> int:
        """Start listening; returns the bound port."""
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: _Connection(self), host, port, ssl=ssl_context, reuse_address=True
        )
        self._servers.append(server)
        sock = server.sockets[0]
        return int(sock.getsockname()[1])

    def streams(self) -> int:
        return sum(len(c.streams) for c in self.connections)

    async def _no_streams(self) -> None:
        while self.streams():
            self._idle = asyncio.Event()
            await self._idle.wait()

    def stream_dropped(self) -> None:
        idle = self._idle
        if idle is not None and not self.streams():
            idle.set()

    async def stop(self, grace_s: float) -> None:
        """Stop accepting connections and streams; give running streams ``grace_s``."""
        for srv in self._servers:
            srv.close()
        for c in list(self.connections):
            c.goaway()
            c.flush()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._no_streams(), max(grace_s, 0.0))
        for c in list(self.connections):
            for s in list(c.streams.values()):
                c._reset(s, CANCEL)
            c.close()
        for srv in self._servers:
            with contextlib.suppress(Exception):
                await srv.wait_closed()
        self._servers = []
        self._closed.set()

    async def wait_closed(self) -> None:
        await self._closed.wait()
