"""Requests through a real Envoy reach the endpoint the EPP chose, with the body intact."""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

import orjson
import pytest

pytestmark = pytest.mark.envoy


async def test_traffic_reaches_the_chosen_endpoint(make_stack: Any) -> None:
    st = await make_stack(3)
    for b in st.backends:
        status, body, headers = await st.post({"model": "m", "pick": [b.key]})
        assert status == 200, body
        assert body["served_by"] == b.key
        # Upstream saw the EPP's routing header and Envoy's served-endpoint feedback
        # came back through the response path.
        assert body["headers"]["x-gateway-destination-endpoint"] == b.key
        assert headers["x-epp-picked"] == b.key
    assert [d.finished[0].served_endpoint for d in st.director.decisions] == [
        b.key for b in st.backends
    ]
    assert all(len(d.finished) == 1 and d.finished[0].status == 200 for d in st.director.decisions)


async def test_large_body_is_forwarded_intact_in_chunks(make_stack: Any) -> None:
    st = await make_stack(2)
    payload = orjson.dumps({"model": "m", "pick": [st.backends[1].key], "prompt": "x" * 300_000})
    status, body, _ = await st.post(None, raw=payload)
    assert status == 200, body
    assert body["served_by"] == st.backends[1].key
    assert body["body_len"] == len(payload)
    assert body["body_sha"] == hashlib.sha256(payload).hexdigest()
    assert st.director.requests[-1].body == payload


async def test_bodyless_request_is_routed(make_stack: Any) -> None:
    st = await make_stack(2)
    async with st.session.get(st.url + "/v1/models") as r:
        body = await r.json()
    assert r.status == 200
    assert body["served_by"] == st.backends[0].key  # the director's default
    assert st.director.requests[-1].body == b""


async def test_fallbacks_are_used_when_the_primary_is_down(
    make_stack: Any, dead_endpoint: str
) -> None:
    st = await make_stack(2, extra_pool=[dead_endpoint])
    b0, b1 = st.backends
    for fallback in (b1, b0):
        status, body, _ = await st.post({"model": "m", "pick": [dead_endpoint, fallback.key]})
        assert status == 200, body
        assert body["served_by"] == fallback.key
        # The EPP learns where the request was really served.
        assert st.director.decisions[-1].finished[0].served_endpoint == fallback.key
    # Two dead entries in a row: the third one serves.
    status, body, _ = await st.post({"model": "m", "pick": [dead_endpoint, dead_endpoint, b0.key]})
    assert status == 200, body
    assert body["served_by"] == b0.key


async def test_an_endpoint_outside_the_pool_is_never_used(make_stack: Any) -> None:
    st = await make_stack(2)
    outsider = st.backends.pop()  # running, but not a pool member for the next stack
    st2 = await make_stack(1)
    status, body, _ = await st2.post({"model": "m", "pick": [outsider.key]})
    # Envoy ignores a non-member address and the pool's own policy serves the request.
    assert status == 200, body
    assert body["served_by"] == st2.backends[0].key
    assert outsider.hits == 0


async def test_epp_over_tls(make_stack: Any) -> None:
    st = await make_stack(2, tls=True)
    status, body, _ = await st.post({"model": "m", "pick": [st.backends[1].key]})
    assert status == 200, body
    assert body["served_by"] == st.backends[1].key


async def test_response_bodies_through_the_epp_when_the_director_needs_them(
    make_stack: Any,
) -> None:
    from envoy_stack import PickDirector  # type: ignore[import-not-found]

    director = PickDirector(default=[], needs_response_body=True)
    st = await make_stack(2, director=director, response_body=True)
    director.default = [st.backends[0].key]
    payload = orjson.dumps({"model": "m", "prompt": "y" * 150_000})
    status, body, _ = await st.post(None, raw=payload)
    assert status == 200, body
    # The response body streamed through the EPP arrives intact ...
    assert body["body_sha"] == hashlib.sha256(payload).hexdigest()
    # ... and its usage reached the decision's finish hook.
    (info,) = director.decisions[-1].finished
    assert (info.prompt_tokens, info.completion_tokens) == (len(payload), 1)


async def test_without_response_headers_finish_runs_at_stream_end(make_stack: Any) -> None:
    st = await make_stack(2, response_headers=False)
    status, body, headers = await st.post({"model": "m", "pick": [st.backends[1].key]})
    assert status == 200 and body["served_by"] == st.backends[1].key
    assert "x-epp-picked" not in headers  # no response-header answer from the EPP
    decision = st.director.decisions[-1]
    for _ in range(100):
        if decision.finished:
            break
        await asyncio.sleep(0.02)
    (info,) = decision.finished
    assert info.status is None  # never saw the response headers


async def test_original_dst_mode_routes_to_the_primary(make_stack: Any) -> None:
    """Pool membership unknown to Envoy: the first address of the EPP's list is used."""
    st = await make_stack(2, mode="original_dst")
    b0, b1 = st.backends
    for pick in ([b1.key], [b0.key, b1.key], [b1.key, b0.key]):
        status, body, _ = await st.post(
            {"model": "m", "pick": pick}, headers={"x-gateway-destination-endpoint": "10.9.9.9:1"}
        )
        assert status == 200, body
        assert body["served_by"] == pick[0]
    await st.epp.stop(0)  # fail-closed only: a dead EPP never lets the header steer
    await asyncio.to_thread(st.envoy.wait_epp_health, False)
    status, _, _ = await st.post({"model": "m"}, headers={"x-gateway-destination-endpoint": b1.key})
    assert status >= 500
