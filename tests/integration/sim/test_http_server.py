"""The simulator's HTTP/1.1 server (pdroute.sim.http) over real sockets, byte by byte."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from pdroute.sim.http import MAX_HEADER_BYTES, HttpServer, Request, Response, Stream


class App:
    def __init__(self) -> None:
        self.seen: list[tuple[str, str, str, bytes]] = []
        self.headers: list[dict[str, str]] = []
        self.cancelled = asyncio.Event()
        self.started = asyncio.Event()

    async def __call__(self, req: Request) -> Response | Stream:
        self.seen.append((req.method, req.path, req.query, req.body))
        self.headers.append(req.headers)
        if req.path == "/hang":
            self.started.set()
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                self.cancelled.set()
                raise
        if req.path == "/stream":
            s = req.stream(headers=((b"cache-control", b"no-cache"),))
            await s.write(b"data: 1\n\n")
            s.end(b"data: [DONE]\n\n")
            return s
        if req.path == "/boom":
            raise RuntimeError("bug")
        if req.path == "/slow":
            await asyncio.sleep(0.05)
        return Response(b'{"path":"' + req.path.encode() + b'"}', 200)


@pytest.fixture
async def served() -> AsyncIterator[tuple[App, int]]:
    app = App()
    srv = HttpServer(app, extra_headers=(("x-inference-served-by", "me:1"),), max_body=1000)
    port = await srv.start("127.0.0.1", 0)
    yield app, port
    await srv.close()


async def exchange(port: int, raw: bytes, until_close: bool = True) -> bytes:
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(raw)
    await w.drain()
    data = await asyncio.wait_for(r.read(), 5) if until_close else b""
    w.close()
    return data


def responses(data: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    """Split a byte stream of fixed-length or chunked responses."""
    out = []
    while data:
        head, _, rest = data.partition(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        status = int(lines[0].split()[1])
        hdrs = {k.lower(): v for k, v in (ln.split(": ", 1) for ln in lines[1:])}
        if "content-length" in hdrs:
            n = int(hdrs["content-length"])
            body, data = rest[:n], rest[n:]
        else:
            body = b""
            while True:
                size_line, _, rest = rest.partition(b"\r\n")
                size = int(size_line, 16)
                body += rest[:size]
                rest = rest[size + 2 :]
                if size == 0:
                    break
            data = rest
        out.append((status, hdrs, body))
    return out


async def test_keep_alive_pipelining_answers_in_order(served: tuple[App, int]) -> None:
    _app, port = served
    req = b"POST /slow HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}"
    last = b"GET /b?x=1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    got = responses(await exchange(port, req + b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n" + last))
    assert [(s, b) for s, _h, b in got] == [
        (200, b'{"path":"/slow"}'),
        (200, b'{"path":"/a"}'),
        (200, b'{"path":"/b"}'),
    ]
    hdrs = got[0][1]
    assert hdrs["server"] == "uvicorn" and hdrs["x-inference-served-by"] == "me:1"
    assert hdrs["content-type"] == "application/json" and "date" in hdrs
    assert "connection" not in hdrs and got[2][1]["connection"] == "close"


async def test_chunked_request_body_and_query(served: tuple[App, int]) -> None:
    app, port = served
    raw = (
        b"POST /p?q=2 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n"
        b"\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
    )
    (status, _h, _b), = responses(await exchange(port, raw))  # fmt: skip
    assert status == 200
    assert app.seen == [("POST", "/p", "q=2", b"abcde")]


async def test_expect_100_continue(served: tuple[App, int]) -> None:
    app, port = served
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(b"POST /e HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\n")
    assert await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 5) == b"HTTP/1.1 100 Continue\r\n\r\n"
    w.write(b"xyz")
    head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 200 OK")
    w.close()
    assert app.seen[-1] == ("POST", "/e", "", b"xyz")


async def test_streaming_response_is_chunked(served: tuple[App, int]) -> None:
    _app, port = served
    raw = b"GET /stream HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    (status, hdrs, body), = responses(await exchange(port, raw))  # fmt: skip
    assert status == 200 and hdrs["transfer-encoding"] == "chunked"
    assert hdrs["content-type"] == "text/event-stream; charset=utf-8"
    assert hdrs["cache-control"] == "no-cache"
    assert body == b"data: 1\n\ndata: [DONE]\n\n"


async def test_head_has_length_but_no_body(served: tuple[App, int]) -> None:
    _app, port = served
    data = await exchange(port, b"HEAD /h HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    head, _, rest = data.partition(b"\r\n\r\n")
    assert b"content-length: 13" in head and rest == b""


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"POST /big HTTP/1.1\r\nHost: x\r\nContent-Length: 2000\r\n\r\n" + b"x" * 2000, 413),
        (b"GET / HTTP/1.1\r\nX-Big: " + b"a" * (MAX_HEADER_BYTES + 10) + b"\r\n\r\n", 431),
        (b"NOT HTTP AT ALL\r\n\r\n", 400),
    ],
)
async def test_bad_requests_are_answered_and_closed(
    served: tuple[App, int], raw: bytes, status: int
) -> None:
    app, port = served
    (got, hdrs, body), = responses(await exchange(port, raw))  # fmt: skip
    assert got == status and hdrs["connection"] == "close"
    assert b'"code":' + str(status).encode() in body
    assert app.seen == []


async def test_handler_bug_is_a_json_500_and_connection_survives(
    served: tuple[App, int],
) -> None:
    _app, port = served
    raw = b"GET /boom HTTP/1.1\r\nHost: x\r\n\r\nGET /ok HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    got = responses(await exchange(port, raw))
    assert [s for s, _h, _b in got] == [500, 200]
    assert b"InternalServerError" in got[0][2]


async def test_client_disconnect_cancels_the_handler(served: tuple[App, int]) -> None:
    app, port = served
    _r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(b"GET /hang HTTP/1.1\r\nHost: x\r\n\r\n")
    await asyncio.wait_for(app.started.wait(), 5)
    w.close()
    await asyncio.wait_for(app.cancelled.wait(), 5)


async def test_request_headers_are_lower_cased_and_repeats_joined(served: tuple[App, int]) -> None:
    app, port = served
    raw = b"GET /h HTTP/1.1\r\nHost: x\r\nX-A: 1\r\nx-a: 2\r\nConnection: close\r\n\r\n"
    await exchange(port, raw)
    assert app.headers[-1] == {"host": "x", "x-a": "1, 2", "connection": "close"}
