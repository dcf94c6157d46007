"""BBR through a real Envoy: the JSON ``model`` picks the backend via a route header match.

Envoy bootstrap (written here): an ext_proc filter pointing at the in-process BBR
server, then the router. Routes match ``x-gateway-model-name`` exactly (model-a ->
backend A, model-b -> backend B); without a match a direct 404 answers. The first
route match happens before BBR sets the header, so routing only works because BBR
answers with ``clear_route_cache``.
"""

from __future__ import annotations

import asyncio
import hashlib
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import yaml
from aiohttp import web

from epp.bbr import BbrServer, BodyRouter
from tests.netutil import free_port

pytestmark = pytest.mark.envoy


def _cluster(name: str, port: int, *, h2: bool = False) -> dict[str, Any]:
    c: dict[str, Any] = {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {
                            "endpoint": {
                                "address": {
                                    "socket_address": {"address": "127.0.0.1", "port_value": port}
                                }
                            }
                        }
                    ]
                }
            ],
        },
    }
    if h2:
        c["typed_extension_protocol_options"] = {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        }
    return c


def bootstrap(
    listen: int, admin: int, bbr: int, backends: dict[str, int], body_mode: str
) -> dict[str, Any]:
    routes: list[dict[str, Any]] = [
        {
            "match": {
                "prefix": "/",
                "headers": [{"name": "x-gateway-model-name", "string_match": {"exact": model}}],
            },
            "route": {"cluster": f"pool-{model}"},
        }
        for model in backends
    ]
    routes.append(
        {
            "match": {"prefix": "/"},
            "direct_response": {"status": 404, "body": {"inline_string": "no pool for this model"}},
        }
    )
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
        "static_resources": {
            "listeners": [
                {
                    "name": "main",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": listen}},
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": {
                                        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                                        "stat_prefix": "bbr_test",
                                        "route_config": {
                                            "virtual_hosts": [
                                                {"name": "all", "domains": ["*"], "routes": routes}
                                            ]
                                        },
                                        "http_filters": [
                                            {
                                                "name": "envoy.filters.http.ext_proc",
                                                "typed_config": {
                                                    "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor",
                                                    "grpc_service": {
                                                        "envoy_grpc": {"cluster_name": "bbr"},
                                                        "timeout": "5s",
                                                    },
                                                    "failure_mode_allow": False,
                                                    "message_timeout": "5s",
                                                    "processing_mode": {
                                                        "request_header_mode": "SEND",
                                                        "request_body_mode": body_mode,
                                                        "request_trailer_mode": "SEND"
                                                        if body_mode == "FULL_DUPLEX_STREAMED"
                                                        else "SKIP",
                                                        "response_header_mode": "SKIP",
                                                        "response_body_mode": "NONE",
                                                        "response_trailer_mode": "SKIP",
                                                    },
                                                },
                                            },
                                            {
                                                "name": "envoy.filters.http.router",
                                                "typed_config": {
                                                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
                                                },
                                            },
                                        ],
                                    },
                                }
                            ]
                        }
                    ],
                }
            ],
            "clusters": [_cluster("bbr", bbr, h2=True)]
            + [_cluster(f"pool-{m}", p) for m, p in backends.items()],
        },
    }


@dataclass
class Stack:
    url: str
    session: aiohttp.ClientSession
    hits: dict[str, int]

    async def post(self, data: bytes, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        async with self.session.post(
            self.url + "/v1/chat/completions",
            data=data,
            headers={"content-type": "application/json", **(headers or {})},
        ) as r:
            return r.status, await r.read()


async def _backend(name: str, hits: dict[str, int]) -> tuple[web.AppRunner, int]:
    async def handle(request: web.Request) -> web.Response:
        hits[name] = hits.get(name, 0) + 1
        data = await request.read()
        return web.json_response(
            {
                "served_by": name,
                "model_header": request.headers.get("x-gateway-model-name"),
                "sha": hashlib.sha256(data).hexdigest(),
                "len": len(data),
            }
        )

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, port


def _tail(log: Path) -> str:
    return log.read_text()[-3000:]


def _spawn(binary: str, cfg: Path, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as logf:
        return subprocess.Popen(
            [
                binary,
                "-c",
                str(cfg),
                "--concurrency",
                "1",
                "--disable-hot-restart",
                "-l",
                "warning",
            ],
            stdout=logf,
            stderr=subprocess.STDOUT,
        )


async def _wait_ready(admin: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    async with aiohttp.ClientSession() as s:
        for _ in range(200):
            if proc.poll() is not None:
                pytest.fail(f"envoy exited: {_tail(log)}")
            try:
                async with s.get(f"http://127.0.0.1:{admin}/ready") as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)
    pytest.fail(f"envoy not ready: {_tail(log)}")


@pytest.fixture
async def make_stack(
    envoy_binary: str, tmp_path: Path
) -> AsyncIterator[Callable[[str], Awaitable[Stack]]]:
    cleanups: list[Callable[[], Any]] = []

    async def make(body_mode: str) -> Stack:
        hits: dict[str, int] = {}
        backends = {}
        for model in ("model-a", "model-b"):
            runner, port = await _backend(model, hits)
            cleanups.append(runner.cleanup)
            backends[model] = port
        server = BbrServer(BodyRouter(max_body_bytes=4 * 1024 * 1024), host="127.0.0.1", port=0)
        bbr_port = await server.start()
        cleanups.append(lambda: server.stop(0))
        listen, admin = free_port(), free_port()
        cfg = tmp_path / f"envoy-{body_mode}.yaml"
        cfg.write_text(yaml.safe_dump(bootstrap(listen, admin, bbr_port, backends, body_mode)))
        log = tmp_path / f"envoy-{body_mode}.log"
        proc = await asyncio.to_thread(_spawn, envoy_binary, cfg, log)

        def stop() -> None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

        cleanups.append(stop)
        await _wait_ready(admin, proc, log)
        session = aiohttp.ClientSession()
        cleanups.append(session.close)
        return Stack(f"http://127.0.0.1:{listen}", session, hits)

    yield make
    for c in reversed(cleanups):
        res = c()
        if asyncio.iscoroutine(res):
            await res


@pytest.mark.parametrize("body_mode", ["FULL_DUPLEX_STREAMED", "BUFFERED"])
async def test_model_routes_to_its_pool(
    make_stack: Callable[[str], Awaitable[Stack]], body_mode: str
) -> None:
    stack = await make_stack(body_mode)
    for model in ("model-a", "model-b", "model-a"):
        payload = orjson.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}]})
        status, raw = await stack.post(payload)
        assert status == 200, raw
        got = orjson.loads(raw)
        assert got["served_by"] == model
        assert got["model_header"] == model
        assert got["sha"] == hashlib.sha256(payload).hexdigest()
    assert stack.hits == {"model-a": 2, "model-b": 1}

    # A client cannot steer with its own header: the body decides.
    status, raw = await stack.post(
        orjson.dumps({"model": "model-b"}), headers={"x-gateway-model-name": "model-a"}
    )
    assert status == 200 and orjson.loads(raw)["served_by"] == "model-b"

    # Unknown model: BBR sets the header, no route matches -> the fallback 404.
    status, raw = await stack.post(orjson.dumps({"model": "nope"}))
    assert status == 404 and raw == b"no pool for this model"

    # Bad body: BBR's 400 JSON error reaches the client; no backend is hit.
    before = dict(stack.hits)
    status, raw = await stack.post(b"{not json")
    assert status == 400
    assert "not valid JSON" in orjson.loads(raw)["error"]["message"]
    assert stack.hits == before


async def test_large_body_is_rechunked_intact(
    make_stack: Callable[[str], Awaitable[Stack]],
) -> None:
    stack = await make_stack("FULL_DUPLEX_STREAMED")
    payload = orjson.dumps({"model": "model-b", "prompt": "y" * 700_000})
    status, raw = await stack.post(payload)
    assert status == 200, raw
    got = orjson.loads(raw)
    assert got["served_by"] == "model-b"
    assert got["len"] == len(payload) and got["sha"] == hashlib.sha256(payload).hexdigest()
    # Over BBR's cap: 413 from BBR.
    status, raw = await stack.post(
        orjson.dumps({"model": "model-a", "prompt": "z" * (5 * 1024 * 1024)})
    )
    assert status == 413
