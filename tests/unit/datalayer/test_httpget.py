"""epp.datalayer.httpget against a real local TCP server that answers scripted bytes."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from epp.datalayer.httpget import (
    FetchError,
    MetricsHttpClient,
    client_ssl_context,
    split_host_port,
)

Answer = Callable[[int], list[bytes]]


class Server:
    """Answers the n-th request (0-based, over all connections) with ``answer(n)``,
    written piece by piece; counts connections and requests."""

    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.connections = 0
        self.requests: list[bytes] = []
        self.server: asyncio.Server | None = None
        self.port = 0

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                n = len(self.requests)
                self.requests.append(head)
                for piece in self.answer(n):
                    if piece == b"<close>":
                        writer.close()
                        return
                    if piece == b"<hang>":
                        await asyncio.sleep(30)
                    writer.write(piece)
                    await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


Serve = Callable[[Answer], Awaitable[Server]]


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    servers: list[Server] = []

    async def start(answer: Answer) -> Server:
        s = Server(answer)
        s.server = await asyncio.start_server(s._handle, "127.0.0.1", 0)
        s.port = s.server.sockets[0].getsockname()[1]
        servers.append(s)
        return s

    yield start
    for s in servers:
        assert s.server is not None
        s.server.close()


def ok(body: bytes, extra: bytes = b"") -> list[bytes]:
    return [b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n" % (len(body), extra), body]


def chunked(*chunks: bytes, trailer: bytes = b"") -> list[bytes]:
    out = [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"]
    for c in chunks:
        out.append(b"%x;ext=1\r\n%s\r\n" % (len(c), c))
    out.append(b"0\r\n" + trailer + b"\r\n")
    return out


def bytewise(pieces: list[bytes]) -> list[bytes]:
    data = b"".join(pieces)
    return [data[i : i + 1] for i in range(len(data))]


async def test_content_length_keep_alive_reuses_one_connection(serve: Serve) -> None:
    s = await serve(lambda n: ok(b"metrics %d" % n))
    c = MetricsHttpClient(max_body=1000)
    hp = f"127.0.0.1:{s.port}"
    assert await c.get(hp, "/metrics") == b"metrics 0"
    assert await c.get(hp, "/metrics") == b"metrics 1"
    assert s.connections == 1
    assert s.requests[0].startswith(b"GET /metrics HTTP/1.1\r\nHost: " + hp.encode())
    assert b"Accept-Encoding: identity" in s.requests[0]
    c.close()


async def test_chunked_and_bytewise_delivery_and_trailers(serve: Serve) -> None:
    answers = [
        chunked(b"hello ", b"world"),
        bytewise(chunked(b"a" * 50, b"b" * 3, trailer=b"x-t: 1\r\n")),
        bytewise(ok(b"split head and body")),
    ]
    s = await serve(lambda n: answers[n])
    c = MetricsHttpClient(max_body=1000)
    hp = f"127.0.0.1:{s.port}"
    assert await c.get(hp, "/m") == b"hello world"
    assert await c.get(hp, "/m") == b"a" * 50 + b"b" * 3
    assert await c.get(hp, "/m") == b"split head and body"
    assert s.connections == 1
    c.close()


async def test_body_until_close_and_connection_close_are_not_reused(serve: Serve) -> None:
    answers = [
        [b"HTTP/1.1 200 OK\r\n\r\nuntil ", b"close", b"<close>"],
        ok(b"once", b"Connection: close\r\n"),
        [b"HTTP/1.0 200 OK\r\nContent-Length: 8\r\n\r\nhttp/1.0"],  # stays open
    ]
    s = await serve(lambda n: answers[n] if n < len(answers) else ok(b"fresh"))
    c = MetricsHttpClient(max_body=1000)
    hp = f"127.0.0.1:{s.port}"
    assert await c.get(hp, "/") == b"until close"
    assert await c.get(hp, "/") == b"once"
    assert await c.get(hp, "/") == b"http/1.0"
    assert await c.get(hp, "/") == b"fresh"
    assert s.connections == 4
    c.close()


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        ([b"HTTP/1.1 503 Busy\r\nContent-Length: 0\r\n\r\n"], "HTTP 503"),
        (ok(b"x" * 70), "body of 70 bytes exceeds the limit"),
        (chunked(b"x" * 40, b"y" * 40), "body exceeds 64 bytes"),
        ([b"HTTP/1.1 200 OK\r\n\r\n", b"z" * 100], "body exceeds 64 bytes"),
        ([b"SSH-2.0-OpenSSH\r\n\r\n"], "not an HTTP/1.x response"),
        ([b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\n\r\n"], "content-encoding"),
        ([b"HTTP/1.1 200 OK\r\nContent-Length: x1\r\n\r\n"], "bad content-length"),
        ([b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"], "chunk size"),
    ],
)
async def test_bad_answers_are_errors_and_the_connection_is_dropped(
    serve: Serve, answer: list[bytes], message: str
) -> None:
    s = await serve(lambda n: answer if n == 0 else ok(b"good"))
    c = MetricsHttpClient(max_body=64)
    hp = f"127.0.0.1:{s.port}"
    with pytest.raises(FetchError, match=message):
        await c.get(hp, "/")
    assert await c.get(hp, "/") == b"good"
    assert s.connections == 2
    c.close()


async def test_timeout_mid_response_closes_and_next_get_is_clean(serve: Serve) -> None:
    first = [b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n12345", b"<hang>", b"67890"]
    s = await serve(lambda n: first if n == 0 else ok(b"second"))
    c = MetricsHttpClient(max_body=1000)
    hp = f"127.0.0.1:{s.port}"
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.2):
            await c.get(hp, "/")
    assert await c.get(hp, "/") == b"second"  # not "67890...": a new connection
    assert s.connections == 2
    c.close()


async def test_server_gone_is_an_os_error_and_idle_pool_follows_the_pool(serve: Serve) -> None:
    s = await serve(lambda n: [*ok(b"x"), b"<close>"] if n == 0 else ok(b"y"))
    c = MetricsHttpClient(max_body=1000)
    hp = f"127.0.0.1:{s.port}"
    assert await c.get(hp, "/") == b"x"
    await asyncio.sleep(0.05)  # the server closed the idle connection meanwhile
    assert await c.get(hp, "/") == b"y"  # the dead idle connection was not used
    c.retain(set())
    assert c._idle == {}
    assert s.server is not None
    s.server.close()
    await s.server.wait_closed()
    with pytest.raises(OSError):
        await c.get(hp, "/")
    c.close()


def test_split_host_port() -> None:
    assert split_host_port("10.0.0.1:8000") == ("10.0.0.1", 8000)
    assert split_host_port("[fd00::1]:9090") == ("fd00::1", 9090)
    for bad in ("10.0.0.1", ":80", "h:x"):
        with pytest.raises(ValueError):
            split_host_port(bad)


async def test_tls_without_verification_and_with_verification_failing(tmp_path: Path) -> None:
    """insecureSkipVerify accepts a self-signed server; a verifying client refuses it."""
    from pdroute.tlsutil import self_signed

    key_pem, cert_pem = self_signed("metrics-server")
    (tmp_path / "k.pem").write_bytes(key_pem)
    (tmp_path / "c.pem").write_bytes(cert_pem)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(tmp_path / "c.pem", tmp_path / "k.pem")
    s = Server(lambda n: ok(b"secret metrics"))
    s.server = await asyncio.start_server(s._handle, "127.0.0.1", 0, ssl=server_ctx)
    port = s.server.sockets[0].getsockname()[1]
    try:
        c = MetricsHttpClient(max_body=1000, ssl_context=client_ssl_context(verify=False))
        assert await c.get(f"127.0.0.1:{port}", "/metrics") == b"secret metrics"
        c.close()
        v = MetricsHttpClient(max_body=1000, ssl_context=client_ssl_context(verify=True))
        with pytest.raises(ssl.SSLError):
            await v.get(f"127.0.0.1:{port}", "/metrics")
        v.close()
    finally:
        s.server.close()
