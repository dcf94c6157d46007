"""EPP errors reach the client as JSON; a dead EPP fails open or closed per config;
a client-sent ``x-gateway-destination-endpoint`` never steers traffic."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from envoy_stack import until_served  # type: ignore[import-not-found]

pytestmark = pytest.mark.envoy


def _assert_json_error(status: int, body: Any, headers: Any, expected: int) -> None:
    assert status == expected, body
    assert headers["content-type"] == "application/json"
    assert isinstance(body, dict), body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert body["error"]["code"] == expected


async def test_errors_reach_the_client_as_json(make_stack: Any) -> None:
    st = await make_stack(2, max_body=64 * 1024)
    status, body, headers = await st.post(None, raw=b"{not json")
    _assert_json_error(status, body, headers, 400)
    assert body["error"]["type"] == "bad_request"
    status, body, headers = await st.post({"prompt": "no model"})
    _assert_json_error(status, body, headers, 400)
    status, body, headers = await st.post({"model": "m", "error": 429})
    _assert_json_error(status, body, headers, 429)
    status, body, headers = await st.post({"model": "m", "error": 503})
    _assert_json_error(status, body, headers, 503)
    status, body, headers = await st.post({"model": "m", "prompt": "x" * 200_000})
    _assert_json_error(status, body, headers, 413)
    assert body["error"]["type"] == "payload_too_large"
    # None of these reached a backend; the stack still serves afterwards.
    assert sum(b.hits for b in st.backends) == 0
    status, body, _ = await st.post({"model": "m", "pick": [st.backends[1].key]})
    assert status == 200 and body["served_by"] == st.backends[1].key


@pytest.mark.parametrize("transport", ["h2", "grpcio"])
async def test_oversize_body_is_rejected_before_it_is_all_received(
    make_stack: Any, transport: str
) -> None:
    st = await make_stack(1, max_body=64 * 1024, transport=transport)
    sent = 0

    async def body() -> AsyncIterator[bytes]:
        nonlocal sent
        yield b'{"model": "m", "prompt": "'
        for _ in range(16384):  # up to 256 MiB, far more than the cap
            sent += 16384
            yield b"x" * 16384

    async with st.session.post(
        st.url + "/v1/completions", data=body(), headers={"content-type": "application/json"}
    ) as r:
        status = r.status
        doc = orjson.loads(await r.read())
    assert status == 413
    assert doc["error"]["type"] == "payload_too_large"
    # The answer came long before the body ended. (What was "sent" includes the
    # kernel's socket buffers and Envoy's, several MiB on loopback.)
    assert sent < 64 * 1024 * 1024


async def test_client_routing_header_is_stripped_and_ignored(make_stack: Any) -> None:
    st = await make_stack(3)
    b0, _b1, b2 = st.backends
    status, body, _ = await st.post(
        {"model": "m", "pick": [b0.key]},
        headers={
            "x-gateway-destination-endpoint": b2.key,
            "x-gateway-destination-endpoint-served": b2.key,
            "x-prefiller-host-port": "10.9.9.9:1",
        },
    )
    assert status == 200, body
    assert body["served_by"] == b0.key
    assert body["headers"]["x-gateway-destination-endpoint"] == b0.key
    assert "x-gateway-destination-endpoint-served" not in body["headers"]
    assert "x-prefiller-host-port" not in body["headers"]
    # The director never saw the client's system headers.
    seen = st.director.requests[-1].headers
    assert not any(k.startswith("x-gateway-destination-endpoint") for k in seen)
    assert "x-prefiller-host-port" not in seen
    assert b2.hits == 0


async def test_dead_epp_fail_open_serves_only_pool_members(make_stack: Any) -> None:
    outsider_stack = await make_stack(1)
    outsider = outsider_stack.backends[0]
    st = await make_stack(2, failure_mode_allow=True)
    await st.epp.stop(0)
    # Envoy's health check notices the dead EPP; from then on no stream is opened.
    await asyncio.to_thread(st.envoy.wait_epp_health, False)
    await until_served(lambda: st.post({"model": "m"}))
    served = set()
    for _ in range(6):
        # Even a client-sent routing header cannot steer the request outside the pool.
        status, body, _ = await st.post(
            {"model": "m"}, headers={"x-gateway-destination-endpoint": outsider.key}
        )
        assert status == 200, body
        served.add(body["served_by"])
    assert served <= {b.key for b in st.backends}
    assert outsider.hits == 0


async def test_dead_epp_fail_closed_rejects(make_stack: Any) -> None:
    st = await make_stack(2, failure_mode_allow=False)
    await st.epp.stop(0)
    await asyncio.to_thread(st.envoy.wait_epp_health, False)
    status, _, _ = await st.post(
        {"model": "m"}, headers={"x-gateway-destination-endpoint": st.backends[1].key}
    )
    assert status >= 500
    assert sum(b.hits for b in st.backends) == 0
