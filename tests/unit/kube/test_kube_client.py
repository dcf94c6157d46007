"""KubeClient wire behaviour against a tiny local HTTP server (the neighbour)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from pdroute.kube.client import ApiError, KubeClient, KubeConfig, KubeUnavailable
from pdroute.kube.types import Pod


@pytest.fixture
async def server() -> AsyncIterator[tuple[str, list[web.Request]]]:
    seen: list[web.Request] = []

    async def pods(request: web.Request) -> web.StreamResponse:
        seen.append(request)
        if request.query.get("watch") != "true":
            return web.Response(
                body=b'{"kind":"PodList","metadata":{"resourceVersion":"7"},"items":['
                b'{"metadata":{"name":"a","namespace":"ns","resourceVersion":"5"},'
                b'"status":{"podIP":"10.0.0.1","extra":{"ignored":true}}}]}',
                content_type="application/json",
            )
        resp = web.StreamResponse()
        await resp.prepare(request)
        # One event split over three writes, then two in one write, then a huge one.
        await resp.write(b'{"type":"ADDED","object":{"metadata":{"na')
        await resp.write(b'me":"b","resourceVersion":"8"}}}')
        await resp.write(b'\n{"type":"BOOKMARK","object":{"metadata":{"resourceVersion":"9"}}}\n')
        await resp.write(
            b'{"type":"DELETED","object":{"metadata":{"name":"a","resourceVersion":"10"}}}\n'
        )
        if request.query.get("labelSelector") == "huge":
            await resp.write(b'{"type":"ADDED","object":{"x":"' + b"y" * 4096)
        return resp

    async def forbidden(request: web.Request) -> web.Response:
        return web.Response(
            status=403,
            body=b'{"kind":"Status","code":403,"reason":"Forbidden","message":"pods is forbidden"}',
        )

    app = web.Application()
    app.router.add_get("/api/v1/namespaces/ns/pods", pods)
    app.router.add_get("/forbidden", forbidden)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    yield f"http://127.0.0.1:{port}", seen
    await runner.cleanup()


async def test_list_decodes_typed_items_and_sends_token(
    server: tuple[str, list[web.Request]], tmp_path: Path
) -> None:
    url, seen = server
    tok = tmp_path / "token"
    tok.write_text("s3cret\n")
    async with KubeClient(KubeConfig(server=url, token_file=str(tok))) as c:
        items, rv = await c.list("/api/v1/namespaces/ns/pods", Pod, label_selector="app=m")
    assert rv == "7"
    assert [(p.metadata.name, p.status.pod_ip) for p in items] == [("a", "10.0.0.1")]
    assert seen[0].headers["Authorization"] == "Bearer s3cret"
    assert seen[0].query["labelSelector"] == "app=m"


async def test_watch_splits_lines_across_chunks(server: tuple[str, list[web.Request]]) -> None:
    url, seen = server
    opened: list[bool] = []
    async with KubeClient(KubeConfig(server=url)) as c:
        events = [
            e
            async for e in c.watch(
                "/api/v1/namespaces/ns/pods",
                resource_version="7",
                on_open=lambda: opened.append(True),
            )
        ]
    assert [e.type for e in events] == ["ADDED", "BOOKMARK", "DELETED"]
    assert opened == [True]
    q = seen[0].query
    assert (q["watch"], q["resourceVersion"], q["allowWatchBookmarks"]) == ("true", "7", "true")


async def test_oversized_event_is_refused(server: tuple[str, list[web.Request]]) -> None:
    url, _ = server
    async with KubeClient(KubeConfig(server=url), max_event_bytes=1024) as c:
        with pytest.raises(KubeUnavailable, match="larger than 1024"):
            async for _ in c.watch(
                "/api/v1/namespaces/ns/pods", resource_version="7", label_selector="huge"
            ):
                pass


async def test_error_status_is_decoded(server: tuple[str, list[web.Request]]) -> None:
    url, _ = server
    async with KubeClient(KubeConfig(server=url)) as c:
        with pytest.raises(ApiError) as ei:
            await c.request("GET", "/forbidden")
    assert ei.value.status == 403 and ei.value.reason == "Forbidden"
    assert "pods is forbidden" in str(ei.value)


async def test_connection_refused_is_unavailable() -> None:
    # Bind then close: nothing listens there.
    srv = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    srv.close()
    await srv.wait_closed()
    async with KubeClient(KubeConfig(server=f"http://127.0.0.1:{port}")) as c:
        with pytest.raises(KubeUnavailable):
            await c.request("GET", "/api")
