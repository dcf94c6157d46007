"""The sidecar proxy against fake prefill/decode servers: exact leg shapes, streaming,
SSRF, retries, failure policies, timeouts, limits."""

from __future__ import annotations

import asyncio
import ssl
from typing import Any

import orjson
import pytest
from aiohttp import web
from sidecar_fakes import Handler, HarnessFactory, Seen
from vllm_sidecar.cmd import self_signed_context

from pdroute.protocol.kv_transfer import PREFILL_REQUEST_PARAMS

PARAMS = {
    "do_remote_prefill": True,
    "do_remote_decode": False,
    "remote_block_ids": [[4, 5]],
    "remote_engine_id": "engine-p",
    "remote_request_id": "cmpl-abc",
    "remote_host": "127.0.0.1",
    "remote_port": 15601,
    "tp_size": 1,
    "unknown_new_field": [1, {"a": None}],
}
REQ = {
    "model": "m",
    "prompt": "long prompt " * 50,
    "max_tokens": 16,
    "temperature": 0,
    "stream": False,
}


def prefill_ok(cached: int = 7) -> Handler:
    async def handler(request: web.Request, seen: Seen) -> web.StreamResponse:
        return web.json_response(
            {
                "choices": [{"text": "x"}],
                "usage": {"prompt_tokens": 300, "prompt_tokens_details": {"cached_tokens": cached}},
                "kv_transfer_params": PARAMS,
            }
        )

    return handler


async def decode_json(request: web.Request, seen: Seen) -> web.StreamResponse:
    return web.json_response(
        {
            "choices": [{"text": "decoded"}],
            "usage": {"prompt_tokens": 300, "prompt_tokens_details": {"cached_tokens": 300}},
        },
        headers={"x-upstream": "decode"},
    )


def status_handler(status: int, body: Any = None) -> Handler:
    async def handler(request: web.Request, seen: Seen) -> web.StreamResponse:
        return web.json_response(body or {"error": {"message": f"boom {status}"}}, status=status)

    return handler


async def test_pd_completions_leg_shapes(make_harness: HarnessFactory) -> None:
    h = await make_harness()
    h.prefill.handler = prefill_ok(cached=7)
    h.decode.handler = decode_json
    status, headers, body = await h.post(
        "/v1/completions?foo=1",
        REQ,
        {
            "x-prefiller-host-port": h.prefill.host_port,
            "authorization": "Bearer t",
            "x-custom": "c",
        },
    )
    assert status == 200, body
    assert headers["x-upstream"] == "decode"
    out = orjson.loads(body)
    assert out["choices"][0]["text"] == "decoded"
    assert out["usage"]["prompt_tokens_details"]["cached_tokens"] == 7  # prefiller's count

    [p] = h.prefill.seen
    [d] = h.decode.seen
    assert p.method == d.method == "POST"
    assert p.path_qs == d.path_qs == "/v1/completions?foo=1"
    expected_prefill = dict(REQ)
    expected_prefill.update(stream=False, max_tokens=1, kv_transfer_params=PREFILL_REQUEST_PARAMS)
    assert p.json() == expected_prefill
    assert d.json() == {**REQ, "kv_transfer_params": PARAMS}  # original + verbatim params
    for seen in (p, d):
        assert "x-prefiller-host-port" not in seen.headers
        assert seen.headers["authorization"] == "Bearer t"
        assert seen.headers["x-custom"] == "c"
        assert seen.headers["content-type"] == "application/json"
    assert p.headers["x-request-id"] == d.headers["x-request-id"]
    assert len(p.headers["x-request-id"]) == 36
    assert h.counter("pdroute_sidecar_requests_total", mode="pd", code="200") == 1


async def test_client_request_id_is_kept(make_harness: HarnessFactory) -> None:
    h = await make_harness()
    h.prefill.handler = prefill_ok()
    h.decode.handler = decode_json
    await h.post(
        "/v1/completions",
        REQ,
        {"x-prefiller-host-port": h.prefill.host_port, "x-request-id": "rid-1"},
    )
    assert h.prefill.seen[0].headers["x-request-id"] == "rid-1"
    assert h.decode.seen[0].headers["x-request-id"] == "rid-1"


async def test_first_value_of_comma_list(make_harness: HarnessFactory) -> None:
    h = await make_harness()
    h.prefill.handler = prefill_ok()
    h.decode.handler = decode_json
    status, _, _ = await h.post(
        "/v1/completions", REQ, {"x-prefiller-host-port": f" {h.prefill.host_port} , 10.9.9.9:1"}
    )
    assert status == 200
    assert len(h.prefill.seen) == 1


async def test_chat_streaming_passes_through_unbuffered(make_harness: HarnessFactory) -> None:
    h = await make_harness()
    h.prefill.handler = prefill_ok(cached=3)
    release = asyncio.Event()

    async def decode_sse(request: web.Request, seen: Seen) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b'data: {"choices":[{"delta":{"content":"a"}}],"usage":null}\n\n')
        await asyncio.wait_for(release.wait(), 5)  # only after the client saw chunk 1
        await resp.write(
            b'data: {"choices":[],"usage":{"prompt_tokens":300,'
            b'"prompt_tokens_details":{"cached_tokens":300}}}\n\ndata: [DONE]\n\n'
        )
        await resp.write_eof()
        return resp

    h.decode.handler = decode_sse
    req = {
        "model": "m",
        "messages": [{"role": "user", "content": "hi"}],
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_completion_tokens": 20,
    }
    async with h.session.post(
        h.url + "/v1/chat/completions",
        data=orjson.dumps(req),
        headers={"x-prefiller-host-port": h.prefill.host_port},
    ) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/event-stream")
        first = await asyncio.wait_for(r.content.readuntil(b"\n\n"), 5)
        assert b'"content":"a"' in first
        release.set()
        rest = await r.content.read()
    assert b'"cached_tokens":3' in rest
    assert rest.endswith(b"data: [DONE]\n\n")
    p = h.prefill.seen[0].json()
    assert p["stream"] is False and "stream_options" not in p
    assert p["max_tokens"] == 1 and p["max_completion_tokens"] == 1
    d = h.decode.seen[0].json()
    assert d["stream"] is True and d["stream_options"] == {"include_usage": True}
    assert d["max_completion_tokens"] == 20
    assert d["kv_transfer_params"] == PARAMS


async def test_responses_api_prefill_shape(make_harness: HarnessFactory) -> None:
    h = await make_harness()
    h.prefill.handler = prefill_ok()
    h.decode.handler = decode_json
    req = {"model": "m", "input": "hello", "max_output_tokens": 64}
    status, _, _ = await h.post(
        "/v1/responses", req, {"x-prefiller-host-port": h.prefill.host_port}
    )
    assert status == 200
    p = h.prefill.seen[0].json()
    assert p["max_output_tokens"] == 1 and "max_tokens" not in p
    assert h.decode.seen[0].json() == {**req, "kv_transfer_params": PARAMS}


async def test_no_header_goes_straight_to_decode(make_harness: HarnessFactory) -> None:
    h = await make_harness()
    raw = b'{"model": "m",   "prompt": "p"}'  # odd spacing: must arrive byte-identical
    status, _, _ = await h.post("/v1/completions", raw)
    assert status == 200
    assert h.prefill.seen == []
    assert h.decode.seen[0].body == raw
    assert h.counter("pdroute_sidecar_requests_total", mode="local", code="200") == 1


async def test_client_kv_transfer_params_removed(make_harness: HarnessFactory) -> None:
    h = await make_harness()
    evil = {**REQ, "kv_transfer_params": {**PARAMS, "remote_host": "10.6.6.6"}}
    await h.post("/v1/completions", evil)
    assert "kv_transfer_params" not in h.decode.seen[0].json()
    h2 = await make_harness(allow_client_kv_transfer_params=True)
    await h2.post("/v1/completions", evil)
    assert h2.decode.seen[0].json()["kv_transfer_params"]["remote_host"] == "10.6.6.6"


async def test_other_paths_reverse_proxied(make_harness: HarnessFactory) -> None:
    h = await make_harness()
    async with h.session.get(
        h.url + "/v1/models?x=1", headers={"x-prefiller-host-port": h.prefill.host_port}
    ) as r:
        assert r.status == 200
        assert await r.json() == {"ok": True, "path": "/v1/models"}
    [d] = h.decode.seen
    assert d.method == "GET" and d.path_qs == "/v1/models?x=1"
    assert "x-prefiller-host-port" not in d.headers
    assert h.prefill.seen == []
    # /health is the sidecar's own.
    async with h.session.get(h.url + "/health") as r:
        assert r.status == 200
    h.proxy.draining = True
    async with h.session.get(h.url + "/health") as r:
        assert r.status == 503
    assert len(h.decode.seen) == 1


async def test_ssrf_guard_403(make_harness: HarnessFactory) -> None:
    h = await make_harness(allow_prefill=False)
    status, _, body = await h.post(
        "/v1/completions", REQ, {"x-prefiller-host-port": h.prefill.host_port}
    )
    assert status == 403
    err = orjson.loads(body)["error"]
    assert "SSRF" in err["message"]
    assert h.prefill.seen == [] and h.decode.seen == []
    assert h.counter("pdroute_sidecar_rejected_requests_total", reason="ssrf") == 1


@pytest.mark.parametrize(
    "value", ["http://1.2.3.4:80", "1.2.3.4", "a:b:c", "h:99999", "", "h:80/x"]
)
async def test_bad_prefiller_header_400(make_harness: HarnessFactory, value: str) -> None:
    h = await make_harness()
    status, _, body = await h.post("/v1/completions", REQ, {"x-prefiller-host-port": value})
    assert status == 400, body
    assert orjson.loads(body)["error"]["type"] == "bad_header"
    assert h.prefill.seen == [] and h.decode.seen == []


@pytest.mark.parametrize("body", [b"{not json", b"[1, 2]", b'"s"'])
async def test_bad_json_with_prefiller_400(make_harness: HarnessFactory, body: bytes) -> None:
    h = await make_harness()
    status, _, out = await h.post(
        "/v1/completions", body, {"x-prefiller-host-port": h.prefill.host_port}
    )
    assert status == 400
    assert orjson.loads(out)["error"]["type"] == "invalid_json"
    assert h.prefill.seen == []


async def test_retries_on_503_then_success(make_harness: HarnessFactory) -> None:
    h = await make_harness(prefill_max_retries=2, prefill_retry_backoff_s=0.1)
    calls = 0

    async def flaky(request: web.Request, seen: Seen) -> web.StreamResponse:
        nonlocal calls
        calls += 1
        if calls <= 2:
            return web.json_response({"error": "busy"}, status=503)
        return await prefill_ok()(request, seen)

    h.prefill.handler = flaky
    h.decode.handler = decode_json
    status, _, _ = await h.post(
        "/v1/completions", REQ, {"x-prefiller-host-port": h.prefill.host_port}
    )
    assert status == 200
    assert calls == 3
    assert h.sleeps == [0.1, 0.2]  # exponential backoff
    assert h.decode.seen[0].json()["kv_transfer_params"] == PARAMS
    assert h.counter("pdroute_sidecar_prefill_retries_total") == 2


async def test_no_retry_on_400_and_error_policy_relays(make_harness: HarnessFactory) -> None:
    h = await make_harness(prefill_max_retries=3, on_prefill_failure="error")
    h.prefill.handler = status_handler(400, {"error": {"message": "prompt too long"}})
    status, _, body = await h.post(
        "/v1/completions", REQ, {"x-prefiller-host-port": h.prefill.host_port}
    )
    assert status == 400
    err = orjson.loads(body)["error"]
    assert err["type"] == "prefill_failed"
    assert err["prefiller"] == h.prefill.host_port
    assert err["prefiller_error"] == {"error": {"message": "prompt too long"}}
    assert len(h.prefill.seen) == 1
    assert h.decode.seen == []


async def test_error_policy_after_retries_exhausted(make_harness: HarnessFactory) -> None:
    h = await make_harness(prefill_max_retries=1, on_prefill_failure="error")
    h.prefill.handler = status_handler(503)
    status, _, body = await h.post(
        "/v1/completions", REQ, {"x-prefiller-host-port": h.prefill.host_port}
    )
    assert status == 503
    assert "HTTP 503" in orjson.loads(body)["error"]["message"]
    assert len(h.prefill.seen) == 2
    assert h.decode.seen == []


async def test_local_policy_falls_back_with_original_request(make_harness: HarnessFactory) -> None:
    h = await make_harness(prefill_max_retries=0)
    h.prefill.handler = status_handler(500)
    h.decode.handler = decode_json
    raw = orjson.dumps(REQ)
    status, _, body = await h.post(
        "/v1/completions", raw, {"x-prefiller-host-port": h.prefill.host_port, "x-request-id": "r"}
    )
    assert status == 200
    out = orjson.loads(body)
    assert out["usage"]["prompt_tokens_details"]["cached_tokens"] == 300  # not rewritten
    [d] = h.decode.seen
    assert d.body == raw  # the client's request, untouched
    assert d.headers["x-request-id"] == "r"
    assert "x-prefiller-host-port" not in d.headers
    assert h.counter("pdroute_sidecar_prefill_fallbacks_total", reason="http_500") == 1


async def test_bad_prefill_answer_falls_back(make_harness: HarnessFactory) -> None:
    h = await make_harness()
    h.prefill.handler = status_handler(200, {"choices": [], "kv_transfer_params": None})
    status, _, _ = await h.post(
        "/v1/completions", REQ, {"x-prefiller-host-port": h.prefill.host_port}
    )
    assert status == 200
    assert "kv_transfer_params" not in h.decode.seen[0].json()
    assert h.counter("pdroute_sidecar_prefill_fallbacks_total", reason="bad_answer") == 1


async def test_unreachable_prefiller(make_harness: HarnessFactory) -> None:
    h = await make_harness(prefill_max_retries=2, on_prefill_failure="error")
    dead = h.prefill.host_port
    await h.prefill.stop()
    status, _, body = await h.post("/v1/completions", REQ, {"x-prefiller-host-port": dead})
    assert status == 502
    assert "cannot reach prefiller" in orjson.loads(body)["error"]["message"]
    assert len(h.sleeps) == 2  # connect errors are retried
    assert h.decode.seen == []


async def test_prefill_timeout(make_harness: HarnessFactory) -> None:
    h = await make_harness(prefill_timeout_s=0.1, prefill_max_retries=0, on_prefill_failure="error")

    async def slow(request: web.Request, seen: Seen) -> web.StreamResponse:
        await asyncio.sleep(0.5)
        return await prefill_ok()(request, seen)

    h.prefill.handler = slow
    status, _, body = await h.post(
        "/v1/completions", REQ, {"x-prefiller-host-port": h.prefill.host_port}
    )
    assert status == 504
    assert "timed out" in orjson.loads(body)["error"]["message"]
    # local policy: same timeout, but the client gets a locally decoded answer
    h2 = await make_harness(prefill_timeout_s=0.1, prefill_max_retries=0)
    h2.prefill.handler = slow
    status, _, _ = await h2.post(
        "/v1/completions", REQ, {"x-prefiller-host-port": h2.prefill.host_port}
    )
    assert status == 200
    assert h2.counter("pdroute_sidecar_prefill_fallbacks_total", reason="timeout") == 1


async def test_decode_read_timeout_and_decoder_down(make_harness: HarnessFactory) -> None:
    h = await make_harness(decode_read_timeout_s=0.1)

    async def hang(request: web.Request, seen: Seen) -> web.StreamResponse:
        await asyncio.sleep(0.5)
        return web.json_response({})

    h.decode.handler = hang
    status, _, body = await h.post("/v1/completions", REQ)
    assert status == 504
    assert orjson.loads(body)["error"]["type"] == "decoder_timeout"
    await h.decode.stop()
    status, _, body = await h.post("/v1/completions", REQ)
    assert status == 502
    assert orjson.loads(body)["error"]["type"] == "decoder_unreachable"


async def test_request_size_limit(make_harness: HarnessFactory) -> None:
    h = await make_harness(max_request_bytes=1000)
    status, _, body = await h.post("/v1/completions", b"x" * 1001)
    assert status == 413
    assert orjson.loads(body)["error"]["type"] == "request_too_large"

    async def chunks() -> Any:  # no content-length: the streaming count must catch it
        for _ in range(10):
            yield b"y" * 200

    async with h.session.post(h.url + "/v1/completions", data=chunks()) as r:
        assert r.status == 413
    assert h.decode.seen == []
    status, _, _ = await h.post("/v1/completions", b"z" * 1000)  # at the limit: fine
    assert status == 200


async def test_decode_error_status_passes_through(make_harness: HarnessFactory) -> None:
    h = await make_harness()
    h.prefill.handler = prefill_ok()
    h.decode.handler = status_handler(500, {"error": {"message": "handshake_failed"}})
    status, _, body = await h.post(
        "/v1/completions", REQ, {"x-prefiller-host-port": h.prefill.host_port}
    )
    assert status == 500
    assert orjson.loads(body) == {"error": {"message": "handshake_failed"}}


async def test_metrics_app(make_harness: HarnessFactory) -> None:
    h = await make_harness()
    h.prefill.handler = prefill_ok()
    h.decode.handler = decode_json
    await h.post("/v1/completions", REQ, {"x-prefiller-host-port": h.prefill.host_port})
    runner = web.AppRunner(h.proxy.build_metrics_app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    assert site._server is not None
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
    try:
        async with h.session.get(f"http://127.0.0.1:{port}/metrics") as r:
            text = await r.text()
    finally:
        await runner.cleanup()
    assert 'pdroute_sidecar_leg_duration_seconds_count{leg="prefill"} 1.0' in text
    assert 'pdroute_sidecar_leg_duration_seconds_count{leg="decode"} 1.0' in text
    assert "pdroute_sidecar_added_latency_seconds_count 1.0" in text


async def test_prefiller_tls(make_harness: HarnessFactory) -> None:
    server_ctx = self_signed_context("prefill")
    # Verification on (default): a self-signed prefiller is refused -> local fallback.
    h = await make_harness(prefill_ssl=server_ctx, prefiller_scheme="https", prefill_max_retries=0)
    h.prefill.handler = prefill_ok()
    status, _, _ = await h.post(
        "/v1/completions", REQ, {"x-prefiller-host-port": h.prefill.host_port}
    )
    assert status == 200
    assert h.prefill.seen == []
    assert "kv_transfer_params" not in h.decode.seen[0].json()
    # Insecure skip-verify: the prefill leg runs over TLS.
    h2 = await make_harness(prefill_ssl=server_ctx, prefiller_scheme="https", prefiller_ssl=False)
    h2.prefill.handler = prefill_ok()
    status, _, _ = await h2.post(
        "/v1/completions", REQ, {"x-prefiller-host-port": h2.prefill.host_port}
    )
    assert status == 200
    assert len(h2.prefill.seen) == 1
    assert h2.decode.seen[0].json()["kv_transfer_params"] == PARAMS
    assert isinstance(server_ctx, ssl.SSLContext)


async def test_escaped_kv_transfer_params_key_is_removed(make_harness: HarnessFactory) -> None:
    h = await make_harness()
    raw = b'{"model": "m", "prompt": "p", "kv_transfer\\u005fparams": {"remote_host": "10.6.6.6"}}'
    status, _, _ = await h.post("/v1/completions", raw)
    assert status == 200
    assert h.decode.seen[0].json() == {"model": "m", "prompt": "p"}


async def test_client_disconnect_stops_the_decode_stream(make_harness: HarnessFactory) -> None:
    h = await make_harness()
    upstream_ended = asyncio.Event()
    sent = 0

    async def endless(request: web.Request, seen: Seen) -> web.StreamResponse:
        nonlocal sent
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        try:
            for _ in range(500):
                await resp.write(b'data: {"choices":[{"text":"t"}]}\n\n')
                sent += 1
                await asyncio.sleep(0.01)
        except ConnectionError:
            pass
        finally:
            upstream_ended.set()
        return resp

    h.decode.handler = endless
    async with h.session.post(h.url + "/v1/completions", data=b'{"stream": true}') as r:
        await r.content.readuntil(b"\n\n")
    # The client is gone: the sidecar must drop the upstream stream, not drain it.
    await asyncio.wait_for(upstream_ended.wait(), 3)
    assert sent < 400
    for _ in range(100):
        if h.counter("pdroute_sidecar_leg_failures_total", leg="decode", reason="client_gone"):
            break
        await asyncio.sleep(0.01)
    assert h.counter("pdroute_sidecar_leg_failures_total", leg="decode", reason="client_gone") == 1
