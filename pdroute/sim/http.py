"""A small HTTP/1.1 server for the simulator: asyncio ``Protocol`` + ``httptools`` (llhttp).

Why not aiohttp: sixteen simulated servers share one process and, on the 2-core
machines the stack is tested on, one core with Envoy, the EPP and the load generator.
aiohttp costs ~0.19 ms of CPU per trivial request here (Request/Response objects,
router, middleware signals, header multidicts); this server costs ~0.03 ms, close to
the bare socket floor, so the simulator's CPU is spent on simulating. It serves what
vLLM's uvicorn serves and nothing else: keep-alive, pipelining (answered in order),
``Content-Length`` and chunked request bodies, ``Expect: 100-continue``, HEAD for GET
routes, fixed-length responses and chunked streaming responses with write flow control.

Design:

- one :class:`_Conn` per TCP connection parses with llhttp (C); a complete request
  becomes a :class:`Request` (method, path, lower-cased headers, body) and one task
  runs the handler; pipelined requests wait in a bounded queue (reading pauses beyond
  :data:`MAX_PIPELINED`);
- a handler returns a :class:`Response` (written with one ``transport.write``) or a
  :class:`Stream` it started with :meth:`Request.stream` (chunked transfer encoding;
  ``write`` waits while the transport's buffer is above its high-water mark);
- the client closing the connection cancels the running handler (like aiohttp's
  ``handler_cancellation=True``), so the handler can abort its engine request;
- limits (bounded memory): request line + headers <= :data:`MAX_HEADER_BYTES`
  (else 431), body <= ``max_body`` (else 413), both answered and the connection closed;
  malformed requests get 400 and a close.

Every response carries ``date``, ``server`` and the per-server ``extra_headers``
(the simulator stamps ``x-inference-served-by``). Unexpected handler exceptions are
logged and answered with a JSON 500 (or end a started stream by closing the connection).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from email.utils import formatdate
from http import HTTPStatus
from typing import cast

import httptools

log = logging.getLogger(__name__)

#: Request line + headers, bytes.
MAX_HEADER_BYTES = 64 * 1024
#: Complete requests queued behind the one being answered on a connection.
MAX_PIPELINED = 16

_REASON = {int(s): s.phrase.encode() for s in HTTPStatus}
_JSON = b"application/json"
_INTERNAL = (
    b'{"error":{"message":"Internal server error","type":"InternalServerError",'
    b'"param":null,"code":500}}'
)


def _error_body(status: int, message: str) -> bytes:
    return (
        b'{"error":{"message":"' + message.encode() + b'","type":"BadRequestError",'
        b'"param":null,"code":' + str(status).encode() + b"}}"
    )


class _Date:
    """``date`` header line, re-rendered at most once a second."""

    __slots__ = ("line", "second")

    def __init__(self) -> None:
        self.second = -1
        self.line = b""

    def get(self) -> bytes:
        now = int(time.time())
        if now != self.second:
            self.second = now
            self.line = b"date: " + formatdate(now, usegmt=True).encode() + b"\r\n"
        return self.line


_DATE = _Date()


class Response:
    """A complete response. ``headers``: extra ``(name, value)`` pairs."""

    __slots__ = ("body", "content_type", "headers", "status")

    def __init__(
        self,
        body: bytes = b"",
        status: int = 200,
        content_type: bytes | None = _JSON,
        headers: tuple[tuple[bytes, bytes], ...] = (),
    ) -> None:
        self.body = body
        self.status = status
        self.content_type = content_type
        self.headers = headers


class Request:
    """One parsed request. ``headers`` keys are lower-case; ``body`` is complete."""

    __slots__ = ("_conn", "_headers", "_raw_headers", "body", "method", "path", "query")

    def __init__(
        self, conn: _Conn, method: str, url: bytes, raw_headers: list[bytes], body: bytes
    ) -> None:
        self._conn = conn
        self.method = method
        q = url.find(b"?")
        if q < 0:
            self.path = url.decode("utf-8", "replace")
            self.query = ""
        else:
            self.path = url[:q].decode("utf-8", "replace")
            self.query = url[q + 1 :].decode("utf-8", "replace")
        self._raw_headers = raw_headers
        self._headers: dict[str, str] | None = None
        self.body = body

    @property
    def headers(self) -> dict[str, str]:
        """Lower-cased names; repeated headers joined with ``", "`` (decoded on first use)."""
        if self._headers is None:
            raw = self._raw_headers
            h: dict[str, str] = {}
            for i in range(0, len(raw), 2):
                key = raw[i].decode("latin-1").lower()
                val = raw[i + 1].decode("latin-1")
                prev = h.get(key)
                h[key] = val if prev is None else f"{prev}, {val}"
            self._headers = h
        return self._headers

    def stream(
        self,
        status: int = 200,
        content_type: bytes = b"text/event-stream; charset=utf-8",
        headers: tuple[tuple[bytes, bytes], ...] = (),
    ) -> Stream:
        """Send the status line and headers now; the body follows in chunks."""
        return Stream(self._conn, status, content_type, headers)


class Stream:
    """A chunked response in progress. Invariant: nothing is written after :meth:`end`."""

    __slots__ = ("_conn", "_head", "ended")

    def __init__(
        self,
        conn: _Conn,
        status: int,
        content_type: bytes,
        headers: tuple[tuple[bytes, bytes], ...],
    ) -> None:
        self._conn = conn
        self.ended = False
        #: Status line + headers, sent with the first chunk (one write, one segment).
        self._head = (
            conn.head(status, content_type, headers) + b"transfer-encoding: chunked\r\n\r\n"
        )

    async def write(self, data: bytes) -> None:
        """Send one chunk; waits while the client is not reading (flow control)."""
        if self.ended:
            raise RuntimeError("stream already ended")
        if data:
            self._conn.write(b"%b%x\r\n%b\r\n" % (self._head, len(data), data))
            self._head = b""
            await self._conn.drain()

    def end(self, data: bytes = b"") -> None:
        """Send ``data`` (if any) and the terminating chunk."""
        if self.ended:
            return
        self.ended = True
        if data:
            self._conn.write(b"%b%x\r\n%b\r\n0\r\n\r\n" % (self._head, len(data), data))
        else:
            self._conn.write(self._head + b"0\r\n\r\n")
        self._head = b""


Handler = Callable[[Request], Awaitable[Response | Stream]]


class HttpServer:
    """Serves ``handler`` on one listening socket. ``extra_headers``: sent on every response."""

    def __init__(
        self,
        handler: Handler,
        *,
        server_name: str = "uvicorn",
        extra_headers: tuple[tuple[str, str], ...] = (),
        max_body: int = 64 * 1024 * 1024,
    ) -> None:
        self.handler = handler
        self.max_body = max_body
        self.stamp = b"server: " + server_name.encode() + b"\r\n"
        self.set_extra_headers(extra_headers)
        self._server: asyncio.AbstractServer | None = None
        self._conns: set[_Conn] = set()
        self.port = 0

    def set_extra_headers(self, headers: tuple[tuple[str, str], ...]) -> None:
        self.extra = b"".join(f"{k}: {v}\r\n".encode() for k, v in headers)

    async def start(self, host: str, port: int, backlog: int = 1024) -> int:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _Conn(self), host, port, backlog=backlog, reuse_address=True
        )
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self.port

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for c in list(self._conns):
            c.abort()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)
            self._server = None


class _Conn(asyncio.Protocol):
    """One client connection (llhttp callbacks build requests; one handler task at a time)."""

    def __init__(self, server: HttpServer) -> None:
        self.srv = server
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.hdrs: list[bytes] = []  # name, value, name, value, ...
        self.expect_continue = False
        self.body: list[bytes] = []
        self.nbody = 0
        self.nhead = 0
        self.queue: deque[tuple[Request, bool]] = deque()
        self.task: asyncio.Task[None] | None = None
        self.closed = False
        self.paused_reading = False
        self.paused_writing = False
        self.drain_waiter: asyncio.Future[None] | None = None
        #: A protocol error (status, message): further input is ignored, the connection closes.
        self.error: tuple[int, str] | None = None

    # ---- asyncio.Protocol -----------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.srv._conns.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.srv._conns.discard(self)
        self.queue.clear()
        if self.task is not None and not self.task.done():
            self.task.cancel()  # the handler aborts its engine request
        w = self.drain_waiter
        if w is not None and not w.done():
            w.set_exception(ConnectionResetError("client closed the connection"))
        self.drain_waiter = None

    def pause_writing(self) -> None:
        self.paused_writing = True

    def resume_writing(self) -> None:
        self.paused_writing = False
        w = self.drain_waiter
        if w is not None and not w.done():
            w.set_result(None)
        self.drain_waiter = None

    def data_received(self, data: bytes) -> None:
        if self.error is not None:
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self.fail(400, "protocol upgrades are not supported")
        except httptools.HttpParserError as e:
            cause = e.__context__
            if isinstance(cause, _TooLarge):
                self.fail(cause.status, cause.message)
            else:
                self.fail(400, "malformed HTTP request")

    # ---- llhttp callbacks -----------------------------------------------------------
    def on_message_begin(self) -> None:
        self.url = b""
        self.hdrs = []
        self.expect_continue = False
        self.body = []
        self.nbody = 0
        self.nhead = 0

    def on_url(self, url: bytes) -> None:
        self.url += url
        self.nhead += len(url)
        if self.nhead > MAX_HEADER_BYTES:
            raise _TooLarge(431, "request header fields too large")

    def on_header(self, name: bytes, value: bytes) -> None:
        self.nhead += len(name) + len(value) + 4
        if self.nhead > MAX_HEADER_BYTES:
            raise _TooLarge(431, "request header fields too large")
        self.hdrs += (name, value)
        if len(name) == 6 and name.lower() == b"expect":
            self.expect_continue = value.strip().lower() == b"100-continue"

    def on_headers_complete(self) -> None:
        if self.expect_continue and self.transport:
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        self.nbody += len(body)
        if self.nbody > self.srv.max_body:
            raise _TooLarge(413, f"request body larger than {self.srv.max_body} bytes")
        self.body.append(body)

    def on_message_complete(self) -> None:
        body = self.body[0] if len(self.body) == 1 else b"".join(self.body)
        req = Request(self, self.parser.get_method().decode("ascii"), self.url, self.hdrs, body)
        keep = self.parser.should_keep_alive()
        if self.task is None:
            self.task = asyncio.get_running_loop().create_task(self.serve(req, keep))
        else:
            self.queue.append((req, keep))
            if len(self.queue) >= MAX_PIPELINED and not self.paused_reading and self.transport:
                self.transport.pause_reading()
                self.paused_reading = True

    # ---- responses ------------------------------------------------------------------
    def head(
        self, status: int, content_type: bytes | None, headers: tuple[tuple[bytes, bytes], ...]
    ) -> bytes:
        srv = self.srv
        parts = [
            b"HTTP/1.1 %d %b\r\n" % (status, _REASON.get(status, b"Unknown")),
            _DATE.get(),
            srv.stamp,
            srv.extra,
        ]
        if content_type is not None:
            parts.append(b"content-type: " + content_type + b"\r\n")
        for k, v in headers:
            parts.append(k + b": " + v + b"\r\n")
        return b"".join(parts)

    def write(self, data: bytes) -> None:
        if not self.closed and self.transport is not None:
            self.transport.write(data)

    async def drain(self) -> None:
        if self.closed:
            raise ConnectionResetError("client closed the connection")
        if self.paused_writing:
            w = self.drain_waiter
            if w is None or w.done():
                w = self.drain_waiter = asyncio.get_running_loop().create_future()
            await w

    def respond(self, resp: Response, keep: bool, head_only: bool = False) -> None:
        h = self.head(resp.status, resp.content_type, resp.headers)
        body = resp.body
        conn = b"" if keep else b"connection: close\r\n"
        self.write(
            b"%bcontent-length: %d\r\n%b\r\n%b" % (h, len(body), conn, b"" if head_only else body)
        )

    def fail(self, status: int, message: str) -> None:
        """A protocol-level error: answer it (after the running handler's response) and close."""
        self.error = (status, message)
        self.queue.clear()
        if self.task is None:
            self.respond_error()

    def respond_error(self) -> None:
        assert self.error is not None
        status, message = self.error
        self.respond(Response(_error_body(status, message), status), keep=False)
        self.abort(graceful=True)

    def abort(self, graceful: bool = False) -> None:
        if self.transport is not None and not self.transport.is_closing():
            if graceful:
                self.transport.close()
            else:
                self.transport.abort()

    async def serve(self, req: Request, keep: bool) -> None:
        while True:
            head_only = req.method == "HEAD"
            try:
                result = await self.srv.handler(req)
            except asyncio.CancelledError:
                self.task = None
                raise
            except ConnectionError:
                self.task = None
                self.abort()
                return
            except Exception:
                log.exception("request handler failed: %s %s", req.method, req.path)
                result = Response(_INTERNAL, 500)
            if isinstance(result, Stream):
                if not result.ended:  # a stream that did not finish: the client cannot tell
                    self.task = None
                    self.abort()
                    return
            else:
                self.respond(result, keep and self.error is None, head_only)
            if self.error is not None:
                self.task = None
                self.respond_error()
                return
            if not keep:
                self.task = None
                self.abort(graceful=True)
                return
            if self.paused_reading and len(self.queue) < MAX_PIPELINED // 2 and self.transport:
                self.paused_reading = False
                self.transport.resume_reading()
            if not self.queue or self.closed:
                self.task = None
                return
            req, keep = self.queue.popleft()


class _TooLarge(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
