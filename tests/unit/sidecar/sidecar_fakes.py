"""Fake prefill/decode servers for the sidecar's unit tests.

Each fake is a real aiohttp server on 127.0.0.1 with a free port; it records
every request (method, path, headers, raw body) and answers through a handler
the test sets, so tests can assert the exact shape of both legs.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from vllm_sidecar.allowlist import Allowlist
from vllm_sidecar.metrics import SidecarMetrics
from vllm_sidecar.proxy import SidecarConfig, SidecarProxy


@dataclass
class Seen:
    method: str
    path_qs: str
    headers: dict[str, str]
    header_items: list[tuple[str, str]]
    body: bytes

    def json(self) -> Any:
        return orjson.loads(self.body)


Handler = Callable[[web.Request, Seen], Awaitable[web.StreamResponse]]


async def _default_handler(request: web.Request, seen: Seen) -> web.StreamResponse:
    return web.json_response({"ok": True, "path": request.path})


@dataclass
class FakeServer:
    handler: Handler = _default_handler
    seen: list[Seen] = field(default_factory=list)
    port: int = 0
    runner: web.AppRunner | None = None

    @property
    def host_port(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        seen = Seen(
            request.method,
            request.path_qs,
            {k.lower(): v for k, v in request.headers.items()},
            [(k.lower(), v) for k, v in request.headers.items()],
            body,
        )
        self.seen.append(seen)
        return await self.handler(request, seen)

    async def start(self, ssl_context: Any = None) -> None:
        app = web.Application(client_max_size=1 << 30)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0, ssl_context=ssl_context)
        await site.start()
        server = site._server
        assert server is not None
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


class SetAllowlist:
    def __init__(self, members: set[str]) -> None:
        self.members = members

    def allows(self, host_port: str) -> bool:
        return host_port in self.members

    async def run(self) -> None:
        return None


@dataclass
class Harness:
    prefill: FakeServer
    decode: FakeServer
    proxy: SidecarProxy
    url: str
    session: aiohttp.ClientSession
    allowlist: SetAllowlist
    sleeps: list[float]
    runner: web.AppRunner

    async def post(
        self, path: str, body: Any, headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        data = body if isinstance(body, bytes) else orjson.dumps(body)
        async with self.session.post(self.url + path, data=data, headers=headers or {}) as r:
            return r.status, dict(r.headers), await r.read()

    def counter(self, name: str, **labels: str) -> float:
        value = self.proxy.metrics.registry.get_sample_value(name, labels)
        return float(value or 0.0)


HarnessFactory = Callable[..., Awaitable[Harness]]


@pytest.fixture
async def make_harness() -> AsyncIterator[HarnessFactory]:
    made: list[Harness] = []

    async def factory(
        *,
        allow_prefill: bool = True,
        allowlist: Allowlist | None = None,
        prefill_ssl: Any = None,
        **config: Any,
    ) -> Harness:
        prefill, decode = FakeServer(), FakeServer()
        await prefill.start(prefill_ssl)
        await decode.start()
        members = {prefill.host_port} if allow_prefill else set()
        allow = SetAllowlist(members)
        sleeps: list[float] = []

        async def fake_sleep(s: float) -> None:
            sleeps.append(s)

        cfg = SidecarConfig(decoder_url=f"http://{decode.host_port}", **config)
        proxy = SidecarProxy(cfg, allowlist or allow, SidecarMetrics(), sleep=fake_sleep)
        runner = web.AppRunner(proxy.build_app(), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        assert site._server is not None
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
        h = Harness(
            prefill,
            decode,
            proxy,
            f"http://127.0.0.1:{port}",
            aiohttp.ClientSession(auto_decompress=False),
            allow,
            sleeps,
            runner,
        )
        made.append(h)
        return h

    yield factory
    for h in made:
        await h.session.close()
        await h.runner.cleanup()
        await h.prefill.stop()
        await h.decode.stop()
