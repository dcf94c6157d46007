"""The ext_proc stream state machine over an in-process grpc.aio server."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import grpc
import orjson
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from extproc_fakes import (  # type: ignore[import-not-found]
    REQUEST_HEADERS,
    FakeDecision,
    FakeDirector,
    Mode,
    body_msg,
    headers_msg,
    read_n,
    response_headers_msg,
)

from epp.errors import BadRequest, NoReadyEndpoint, Shed
from epp.handlers import CHUNK_LIMIT
from epp.requestcontrol.api import IncomingRequest


def set_headers(common: pb.CommonResponse) -> dict[str, str]:
    return {h.header.key: h.header.raw_value.decode() for h in common.header_mutation.set_headers}


def lb_value(resp: pb.ProcessingResponse) -> str:
    return str(
        resp.dynamic_metadata.fields["envoy.lb"]
        .struct_value.fields["x-gateway-destination-endpoint"]
        .string_value
    )


def streamed(resps: list[pb.ProcessingResponse]) -> list[tuple[bytes, bool]]:
    out = []
    for r in resps:
        assert r.WhichOneof("response") == "request_body"
        s = r.request_body.response.body_mutation.streamed_response
        out.append((s.body, s.end_of_stream))
    return out


async def wait_for(cond: Any, limit_s: float = 3.0) -> None:
    deadline = asyncio.get_running_loop().time() + limit_s
    while not cond():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.01)


async def test_headers_are_held_until_the_body_is_complete(make_harness: Any) -> None:
    h = await make_harness()
    call = h.open()
    await call.write(headers_msg(REQUEST_HEADERS))
    await call.write(body_msg(b'{"model": "m", '))
    pending = asyncio.ensure_future(call.read())
    done, _ = await asyncio.wait({pending}, timeout=0.2)
    assert not done, "the headers answer must wait for the end of the body"
    assert h.director.requests == []
    await call.write(body_msg(b'"prompt": "hi"}', eos=True))
    first = await asyncio.wait_for(pending, 5)
    assert first.WhichOneof("response") == "request_headers"
    common = first.request_headers.response
    hs = set_headers(common)
    assert hs["x-gateway-destination-endpoint"] == "10.0.0.1:8000,10.0.0.2:8000"
    assert lb_value(first) == "10.0.0.1:8000,10.0.0.2:8000"
    assert common.clear_route_cache
    body = b'{"model": "m", "prompt": "hi"}'
    assert hs["content-length"] == str(len(body))
    # Envoy generated no x-request-id here, so the handler adds one.
    rid = hs["x-request-id"]
    assert rid and h.director.requests[0].request_id == rid
    assert h.director.requests[0].body == body
    (chunk,) = await read_n(call, 1)
    assert streamed([chunk]) == [(body, True)]
    await call.done_writing()


async def test_body_is_resent_in_chunks_with_eos_on_the_last(make_harness: Any) -> None:
    new_body = bytes(range(256)) * 600  # 153,600 bytes -> 62,000 + 62,000 + 29,600
    director = FakeDirector(behaviour=lambda r: FakeDecision(["10.0.0.1:8000"], body=new_body))
    h = await make_harness(director)
    call = h.open()
    await call.write(headers_msg({**REQUEST_HEADERS, "x-request-id": "abc"}))
    for part in (b'{"model": "m", "p": "', b"x" * 100_000, b'"}'):
        await call.write(body_msg(part))
    await call.write(body_msg(b"", eos=True))
    resps = await read_n(call, 4)
    hs = set_headers(resps[0].request_headers.response)
    assert hs["content-length"] == str(len(new_body))
    assert "x-request-id" not in hs  # the client's id is kept, not replaced
    chunks = streamed(resps[1:])
    assert [len(c) for c, _ in chunks] == [
        CHUNK_LIMIT,
        CHUNK_LIMIT,
        len(new_body) - 2 * CHUNK_LIMIT,
    ]
    assert [eos for _, eos in chunks] == [False, False, True]
    assert b"".join(c for c, _ in chunks) == new_body
    assert director.requests[0].request_id == "abc"
    assert len(director.requests[0].body) == 21 + 100_000 + 2


async def test_bodyless_request_is_routed_at_the_headers(make_harness: Any) -> None:
    h = await make_harness()
    call = h.open()
    await call.write(headers_msg({":method": "GET", ":path": "/v1/models"}, eos=True))
    (resp,) = await read_n(call, 1)
    hs = set_headers(resp.request_headers.response)
    assert hs["x-gateway-destination-endpoint"] == "10.0.0.1:8000"
    assert "content-length" not in hs
    assert lb_value(resp) == "10.0.0.1:8000"
    assert len(h.director.bodyless) == 1 and h.director.requests == []
    await call.write(response_headers_msg({":status": "200"}, eos=True))
    (r2,) = await read_n(call, 1)
    assert r2.WhichOneof("response") == "response_headers"
    assert len(h.director.decisions[0].finished) == 1


async def test_duplicate_end_of_stream_is_tolerated(make_harness: Any) -> None:
    h = await make_harness()
    call = h.open()
    await call.write(headers_msg(REQUEST_HEADERS))
    await call.write(body_msg(b'{"model": "m"}', eos=True))
    await call.write(body_msg(b"", eos=True))  # Envoy may repeat the end of stream
    resps = await read_n(call, 2)
    assert [r.WhichOneof("response") for r in resps] == ["request_headers", "request_body"]
    await call.write(response_headers_msg({":status": "200"}))
    (r3,) = await read_n(call, 1)
    assert r3.WhichOneof("response") == "response_headers"
    assert len(h.director.requests) == 1
    d = h.director.decisions[0]
    assert len(d.finished) == 1 and d.finished[0].status == 200


async def test_routing_metadata_travels_in_envoy_lb(make_harness: Any) -> None:
    """Response headers known at routing time (session tokens) go in the envoy.lb
    metadata next to the destination, for the gateway to add to the response."""
    d = FakeDirector(
        behaviour=lambda r: FakeDecision(
            ["10.0.0.9:8000"], routing_metadata={"x-session-token": "dG9r"}
        )
    )
    h = await make_harness(d)
    call = h.open()
    await call.write(headers_msg(REQUEST_HEADERS))
    await call.write(body_msg(b'{"model": "m"}', eos=True))
    r1, _ = await read_n(call, 2)
    lb = r1.dynamic_metadata.fields["envoy.lb"].struct_value.fields
    assert lb["x-gateway-destination-endpoint"].string_value == "10.0.0.9:8000"
    assert lb["x-session-token"].string_value == "dG9r"
    await call.done_writing()


async def test_stream_ends_with_the_response_headers_answer_when_no_body_follows(
    make_harness: Any,
) -> None:
    """Response body mode NONE: the answer to the response headers is the last
    message, so the EPP ends the call with it (OK) instead of waiting for Envoy's
    half-close: one write fewer per request on both sides."""
    h = await make_harness()
    call = h.open()
    await call.write(headers_msg(REQUEST_HEADERS))
    await call.write(body_msg(b'{"model": "m"}', eos=True))
    await read_n(call, 2)
    await call.write(response_headers_msg({":status": "200"}))
    (r3,) = await read_n(call, 1)
    assert r3.WhichOneof("response") == "response_headers"
    # No done_writing() from the client: the server still ends the call.
    assert await asyncio.wait_for(call.read(), 2) is grpc.aio.EOF  # type: ignore[attr-defined]
    assert await call.code() == grpc.StatusCode.OK
    assert len(h.director.decisions[0].finished) == 1


async def test_stream_stays_open_when_a_response_body_follows(make_harness: Any) -> None:
    h = await make_harness()
    call = h.open()
    await call.write(headers_msg(REQUEST_HEADERS, resp_mode=Mode.FULL_DUPLEX_STREAMED))
    await call.write(body_msg(b'{"model": "m"}', eos=True))
    await read_n(call, 2)
    await call.write(response_headers_msg({":status": "200"}))
    await read_n(call, 1)
    read = asyncio.ensure_future(call.read())
    await asyncio.sleep(0.1)
    assert not read.done()  # the server waits for the response body
    await call.write(pb.ProcessingRequest(response_body=pb.HttpBody(body=b"x", end_of_stream=True)))
    r4 = await asyncio.wait_for(read, 2)
    assert r4.WhichOneof("response") == "response_body"
    assert len(h.director.decisions[0].finished) == 1
    await call.done_writing()


def immediate(resp: pb.ProcessingResponse) -> tuple[int, dict[str, Any], dict[str, str]]:
    assert resp.WhichOneof("response") == "immediate_response", resp
    ir = resp.immediate_response
    hs = {h.header.key: h.header.raw_value.decode() for h in ir.headers.set_headers}
    return int(ir.status.code), orjson.loads(ir.body), hs


async def test_oversize_body_gets_413_before_it_is_all_held(make_harness: Any) -> None:
    h = await make_harness(max_request_body_bytes=100_000)
    call = h.open()
    await call.write(headers_msg(REQUEST_HEADERS))
    await call.write(body_msg(b"x" * 40_000))
    await call.write(body_msg(b"x" * 40_000))
    await call.write(body_msg(b"x" * 40_000))  # 120,000 > cap: rejected now, no EOS needed
    (resp,) = await read_n(call, 1)
    status, body, hs = immediate(resp)
    assert status == 413
    assert body["error"]["type"] == "payload_too_large"
    assert hs["content-type"] == "application/json"
    assert h.director.requests == []
    # The stream is over: the server closed it.
    assert await call.read() is not None  # EOF sentinel, not another message
    assert await call.code() is not None


async def test_announced_oversize_body_gets_413_at_the_headers(make_harness: Any) -> None:
    h = await make_harness(max_request_body_bytes=1000)
    call = h.open()
    await call.write(headers_msg({**REQUEST_HEADERS, "content-length": "5000"}))
    (resp,) = await read_n(call, 1)
    assert immediate(resp)[0] == 413


@pytest.mark.parametrize(
    ("exc", "status"),
    [
        (BadRequest("request body is not JSON"), 400),
        (Shed("pool saturated"), 429),
        (NoReadyEndpoint("no ready endpoint"), 503),
    ],
)
async def test_director_errors_become_json_immediate_responses(
    make_harness: Any, exc: Exception, status: int
) -> None:
    def boom(_: IncomingRequest) -> FakeDecision:
        raise exc

    h = await make_harness(FakeDirector(behaviour=boom))
    call = h.open()
    await call.write(headers_msg(REQUEST_HEADERS))
    await call.write(body_msg(b"{not json", eos=True))
    (resp,) = await read_n(call, 1)
    got, body, hs = immediate(resp)
    assert got == status
    assert body["error"]["code"] == status
    assert body["error"]["message"] == str(exc)
    assert hs["content-type"] == "application/json"


async def test_empty_endpoint_list_is_503(make_harness: Any) -> None:
    h = await make_harness(FakeDirector(behaviour=lambda r: FakeDecision([])))
    call = h.open()
    await call.write(headers_msg(REQUEST_HEADERS))
    await call.write(body_msg(b"{}", eos=True))
    (resp,) = await read_n(call, 1)
    assert immediate(resp)[0] == 503


async def test_unexpected_error_is_500_and_does_not_affect_a_concurrent_stream(
    make_harness: Any, caplog: pytest.LogCaptureFixture
) -> None:
    def behaviour(r: IncomingRequest) -> FakeDecision | None:
        if b"bad" in r.body:
            raise RuntimeError("bug in a plugin")
        return None

    h = await make_harness(FakeDirector(behaviour=behaviour, delay_s=0.05))
    good, bad = h.open(), h.open()
    await good.write(headers_msg(REQUEST_HEADERS))
    await bad.write(headers_msg(REQUEST_HEADERS))
    await good.write(body_msg(b'{"good": 1}', eos=True))
    with caplog.at_level(logging.ERROR, logger="epp.handlers.stream"):
        await bad.write(body_msg(b'{"bad": 1}', eos=True))
        (bad_resp,) = await read_n(bad, 1)
    status, body, _ = immediate(bad_resp)
    assert status == 500 and body["error"]["type"] == "internal_error"
    assert "bug in a plugin" in caplog.text
    resps = await read_n(good, 2)
    assert resps[0].WhichOneof("response") == "request_headers"
    assert streamed(resps[1:]) == [(b'{"good": 1}', True)]


async def test_client_disconnect_finishes_the_decision_once(make_harness: Any) -> None:
    h = await make_harness()
    call = h.open()
    await call.write(headers_msg(REQUEST_HEADERS))
    await call.write(body_msg(b'{"model": "m"}', eos=True))
    await read_n(call, 2)
    d = h.director.decisions[0]
    assert d.finished == []
    call.cancel()  # Envoy resets the stream: the client went away mid-response
    await wait_for(lambda: len(d.finished) == 1)
    await asyncio.sleep(0.05)
    assert len(d.finished) == 1
    assert d.finished[0].status is None


async def test_client_disconnect_while_routing_finishes_once(make_harness: Any) -> None:
    h = await make_harness(FakeDirector(delay_s=0.2))
    call = h.open()
    await call.write(headers_msg(REQUEST_HEADERS))
    await call.write(body_msg(b'{"model": "m"}', eos=True))
    await wait_for(lambda: len(h.director.requests) == 1)
    call.cancel()
    await asyncio.sleep(0.3)
    # Routing was cancelled with the stream: no decision was made, so nothing is
    # left in flight, and the handler keeps serving other streams.
    assert h.director.decisions == []
    call2 = h.open()
    await call2.write(headers_msg(REQUEST_HEADERS))
    await call2.write(body_msg(b'{"model": "m"}', eos=True))
    assert len(await read_n(call2, 2)) == 2


async def test_client_system_headers_are_stripped(make_harness: Any) -> None:
    h = await make_harness(
        FakeDirector(
            behaviour=lambda r: FakeDecision(
                ["10.0.0.1:8000"], set_headers={"x-prefiller-host-port": "10.0.0.9:8000"}
            )
        )
    )
    call = h.open()
    client = {
        **REQUEST_HEADERS,
        "x-gateway-destination-endpoint": "6.6.6.6:80",
        "x-gateway-destination-endpoint-served": "6.6.6.6:80",
        "x-gateway-destination-endpoint-subset": "6.6.6.6:80",
        "x-prefiller-host-port": "6.6.6.6:80",
        "x-data-parallel-host-port": "6.6.6.6:80",
        "x-user": "kept",
    }
    await call.write(headers_msg(client))
    await call.write(body_msg(b'{"model": "m"}', eos=True))
    resps = await read_n(call, 2)
    seen = h.director.requests[0].headers
    assert "x-user" in seen
    assert not any(k.startswith("x-gateway-destination-endpoint") for k in seen)
    assert "x-prefiller-host-port" not in seen and "x-data-parallel-host-port" not in seen
    common = resps[0].request_headers.response
    hs = set_headers(common)
    assert hs["x-gateway-destination-endpoint"] == "10.0.0.1:8000"
    assert hs["x-prefiller-host-port"] == "10.0.0.9:8000"
    removed = set(common.header_mutation.remove_headers)
    assert removed == {
        "x-gateway-destination-endpoint-served",
        "x-gateway-destination-endpoint-subset",
        "x-data-parallel-host-port",
    }


def subset_md(value: Any) -> base_pb2.Metadata:
    md = base_pb2.Metadata()
    field = md.filter_metadata["envoy.lb.subset_hint"].fields[
        "x-gateway-destination-endpoint-subset"
    ]
    if isinstance(value, list):
        field.list_value.values.add().string_value = value[0]
        for v in value[1:]:
            field.list_value.values.add().string_value = v
    else:
        field.string_value = value
    return md


@pytest.mark.parametrize(
    ("hint", "expected"),
    [
        (["10.0.0.2:8000", "10.0.0.3:8000"], ["10.0.0.2:8000", "10.0.0.3:8000"]),
        ("10.0.0.2:8000, 10.0.0.3:8000", ["10.0.0.2:8000", "10.0.0.3:8000"]),
    ],
)
async def test_subset_hint_is_passed_to_the_director(
    make_harness: Any, hint: Any, expected: list[str]
) -> None:
    h = await make_harness()
    call = h.open()
    await call.write(headers_msg(REQUEST_HEADERS, metadata=subset_md(hint)))
    await call.write(body_msg(b"{}", eos=True))
    await read_n(call, 2)
    assert h.director.requests[0].subset_hint == expected


async def test_subset_hint_absent_or_disabled_is_none(make_harness: Any) -> None:
    h = await make_harness()
    call = h.open()
    await call.write(headers_msg(REQUEST_HEADERS))
    await call.write(body_msg(b"{}", eos=True))
    await read_n(call, 2)
    assert h.director.requests[0].subset_hint is None
    h2 = await make_harness(honor_subset_hint=False)
    call = h2.open()
    await call.write(headers_msg(REQUEST_HEADERS, metadata=subset_md(["10.0.0.2:8000"])))
    await call.write(body_msg(b"{}", eos=True))
    await read_n(call, 2)
    assert h2.director.requests[0].subset_hint is None


async def test_served_endpoint_and_response_headers(make_harness: Any) -> None:
    h = await make_harness(
        FakeDirector(
            behaviour=lambda r: FakeDecision(
                ["10.0.0.1:8000", "10.0.0.2:8000"],
                extra_response_headers={"x-session-token": "tok"},
            )
        )
    )
    call = h.open()
    await call.write(headers_msg(REQUEST_HEADERS))
    await call.write(body_msg(b"{}", eos=True))
    await read_n(call, 2)
    await call.write(response_headers_msg({":status": "200", "x-a": "b"}, served="10.0.0.2:8000"))
    (resp,) = await read_n(call, 1)
    assert set_headers(resp.response_headers.response) == {"x-session-token": "tok"}
    (info,) = h.director.decisions[0].finished
    assert info.served_endpoint == "10.0.0.2:8000"
    assert info.status == 200
    assert info.headers["x-a"] == "b"


async def test_served_endpoint_from_the_upstream_address_attribute(make_harness: Any) -> None:
    h = await make_harness()
    call = h.open()
    await call.write(headers_msg(REQUEST_HEADERS))
    await call.write(body_msg(b"{}", eos=True))
    await read_n(call, 2)
    msg = response_headers_msg({":status": "503"})
    msg.attributes["envoy.filters.http.ext_proc"].fields[
        "upstream.address"
    ].string_value = "10.0.0.2:8000"
    await call.write(msg)
    await read_n(call, 1)
    (info,) = h.director.decisions[0].finished
    assert info.served_endpoint == "10.0.0.2:8000"
    assert info.status == 503


async def test_buffered_mode(make_harness: Any) -> None:
    h = await make_harness()
    call = h.open()
    await call.write(
        headers_msg({**REQUEST_HEADERS, "x-prefiller-host-port": "6.6.6.6:1"}, mode=Mode.BUFFERED)
    )
    # In BUFFERED mode Envoy waits for this answer before sending the body.
    (first,) = await read_n(call, 1)
    assert list(first.request_headers.response.header_mutation.remove_headers) == [
        "x-prefiller-host-port"
    ]
    await call.write(body_msg(b'{"model": "m"}', eos=True))
    (second,) = await read_n(call, 1)
    assert second.WhichOneof("response") == "request_body"
    common = second.request_body.response
    assert set_headers(common)["x-gateway-destination-endpoint"] == "10.0.0.1:8000,10.0.0.2:8000"
    assert common.clear_route_cache
    assert lb_value(second) == "10.0.0.1:8000,10.0.0.2:8000"
    assert not common.HasField("body_mutation")  # body unchanged: nothing to replace


async def test_response_body_is_echoed_and_usage_reported(make_harness: Any) -> None:
    h = await make_harness(FakeDirector(needs_response_body=True))
    call = h.open()
    await call.write(headers_msg(REQUEST_HEADERS, resp_mode=Mode.FULL_DUPLEX_STREAMED))
    await call.write(body_msg(b"{}", eos=True))
    await read_n(call, 2)
    await call.write(response_headers_msg({":status": "200", "content-type": "text/event-stream"}))
    await read_n(call, 1)
    assert h.director.decisions[0].finished == []  # the body is still to come
    event = b'data: {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 3}}\n\n'
    parts = [
        b'data: {"choices": [{"text": "a"}]}\n\n' + event[:20],
        event[20:],
        b"data: [DONE]\n\n",
    ]
    for i, p in enumerate(parts):
        await call.write(
            pb.ProcessingRequest(
                response_body=pb.HttpBody(body=p, end_of_stream=i == len(parts) - 1)
            )
        )
    echoed = await read_n(call, 3)
    got = [
        (r.response_body.response.body_mutation.streamed_response.body,
         r.response_body.response.body_mutation.streamed_response.end_of_stream)
        for r in echoed
    ]  # fmt: skip
    assert got == [(p, i == 2) for i, p in enumerate(parts)]
    (info,) = h.director.decisions[0].finished
    assert (info.prompt_tokens, info.completion_tokens) == (7, 3)


async def test_model_label_values_are_bounded(make_harness: Any) -> None:
    from epp import metrics
    from epp.handlers.stream import MAX_MODEL_LABELS

    names = iter(f"rand-model-{i}" for i in range(MAX_MODEL_LABELS + 20))
    h = await make_harness(
        FakeDirector(behaviour=lambda r: FakeDecision(["10.0.0.1:8000"], model=next(names)))
    )
    for _ in range(MAX_MODEL_LABELS + 20):
        call = h.open()
        await call.write(headers_msg(REQUEST_HEADERS))
        await call.write(body_msg(b"{}", eos=True))
        await read_n(call, 2)
        await call.write(response_headers_msg({":status": "200"}))
        await read_n(call, 1)
    labels = {
        s.labels["model_name"]
        for fam in metrics.REQUESTS.collect()
        for s in fam.samples
        if s.name.endswith("_total")
    }
    ours = {x for x in labels if x.startswith("rand-model-")}
    assert len(ours) <= MAX_MODEL_LABELS
    assert "other" in labels


def test_system_owned_names_match_the_handlers_prefilter() -> None:
    """The handler only calls is_system_owned for "x-*" and content-length; a new
    system-owned name outside that shape must update the handler's prefilter."""
    from pdroute.protocol.headers import SYSTEM_OWNED_NAMES, SYSTEM_OWNED_PREFIXES

    for name in [*SYSTEM_OWNED_NAMES, *SYSTEM_OWNED_PREFIXES]:
        assert name.startswith("x-") or name == "content-length", name
