"""BBR ext_proc server over real in-process gRPC: modes, chunking, errors, health."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import orjson
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from epp.bbr import BbrServer, BodyRouter, model_from_body
from epp.bbr.server import Reader
from epp.errors import BadRequest

Mode = processing_mode_pb2.ProcessingMode
EOF: object = grpc.aio.EOF  # type: ignore[attr-defined]


@pytest.fixture
async def channel() -> AsyncIterator[grpc.aio.Channel]:
    server = BbrServer(BodyRouter(max_body_bytes=300_000), host="127.0.0.1", port=0)
    port = await server.start()
    ch = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    yield ch
    await ch.close(None)
    await server.stop(0)


def headers(
    mode: int | None, *, eos: bool = False, extra: dict[str, str] | None = None
) -> pb.ProcessingRequest:
    hm = base_pb2.HeaderMap(
        headers=[
            base_pb2.HeaderValue(key=k, raw_value=v.encode())
            for k, v in {":path": "/v1/completions", **(extra or {})}.items()
        ]
    )
    req = pb.ProcessingRequest(request_headers=pb.HttpHeaders(headers=hm, end_of_stream=eos))
    if mode is not None:
        req.protocol_config.request_body_mode = mode  # type: ignore[assignment]
    return req


def body(data: bytes, eos: bool = True) -> pb.ProcessingRequest:
    return pb.ProcessingRequest(request_body=pb.HttpBody(body=data, end_of_stream=eos))


async def exchange(
    ch: grpc.aio.Channel, msgs: list[pb.ProcessingRequest], n_replies: int
) -> list[pb.ProcessingResponse]:
    call = pb_grpc.ExternalProcessorStub(ch).Process()
    for m in msgs:
        await call.write(m)
    out = []
    for _ in range(n_replies):
        r = await call.read()
        assert r is not EOF
        out.append(r)
    await call.done_writing()
    assert await call.read() is EOF  # nothing more
    return out


def set_header(common: pb.CommonResponse) -> dict[str, str]:
    return {h.header.key: h.header.raw_value.decode() for h in common.header_mutation.set_headers}


async def test_full_duplex_sets_header_and_rechunks(channel: grpc.aio.Channel) -> None:
    payload = orjson.dumps({"model": "llama-3-8b", "prompt": "x" * 150_000})
    parts = [payload[:70_000], payload[70_000:]]
    replies = await exchange(
        channel,
        [headers(Mode.FULL_DUPLEX_STREAMED), body(parts[0], eos=False), body(parts[1])],
        1 + 3,
    )
    first = replies[0]
    assert first.WhichOneof("response") == "request_headers"
    common = first.request_headers.response
    assert set_header(common) == {"x-gateway-model-name": "llama-3-8b"}
    assert (
        common.header_mutation.set_headers[0].append_action
        == base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
    )
    assert common.clear_route_cache
    chunks = [r.request_body.response.body_mutation.streamed_response for r in replies[1:]]
    assert all(len(c.body) <= 62_000 for c in chunks)
    assert b"".join(c.body for c in chunks) == payload
    assert [c.end_of_stream for c in chunks] == [False, False, True]


async def test_buffered_mutates_on_body_answer(channel: grpc.aio.Channel) -> None:
    call = pb_grpc.ExternalProcessorStub(channel).Process()
    await call.write(headers(Mode.BUFFERED, extra={"x-gateway-model-name": "spoofed"}))
    r1 = await call.read()
    # Headers answered at once (Envoy waits for it before sending the body); the
    # client's own model header is removed.
    assert list(r1.request_headers.response.header_mutation.remove_headers) == [
        "x-gateway-model-name"
    ]
    await call.write(body(b'{"model": "m2", "messages": []}'))
    r2 = await call.read()
    common = r2.request_body.response
    assert set_header(common) == {"x-gateway-model-name": "m2"}
    assert common.clear_route_cache and not common.HasField("body_mutation")
    await call.done_writing()


async def test_no_body_strips_header(channel: grpc.aio.Channel) -> None:
    (r,) = await exchange(channel, [headers(Mode.FULL_DUPLEX_STREAMED, eos=True)], 1)
    assert list(r.request_headers.response.header_mutation.remove_headers) == [
        "x-gateway-model-name"
    ]
    assert not r.request_headers.response.clear_route_cache


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (b"not json", "not valid JSON"),
        (b"[1, 2]", "JSON object"),
        (b'{"prompt": "x"}', "no 'model'"),
        (b'{"model": 7}', "no 'model'"),
        (b'{"model": "a\\r\\nx-evil: 1"}', "control characters"),
        (b"", "empty"),
    ],
)
async def test_bad_bodies_get_400_json(
    channel: grpc.aio.Channel, data: bytes, fragment: str
) -> None:
    (r,) = await exchange(channel, [headers(Mode.FULL_DUPLEX_STREAMED), body(data)], 1)
    ir = r.immediate_response
    assert ir.status.code == 400
    err = orjson.loads(ir.body)["error"]
    assert fragment in err["message"] and err["code"] == 400
    assert {h.header.key: h.header.raw_value for h in ir.headers.set_headers}[
        "content-type"
    ] == b"application/json"


async def test_body_cap_413(channel: grpc.aio.Channel) -> None:
    big = b"x" * 200_000
    (r,) = await exchange(channel, [headers(None), body(big, eos=False), body(big)], 1)
    assert r.immediate_response.status.code == 413


async def test_unsupported_mode_500(channel: grpc.aio.Channel) -> None:
    (r,) = await exchange(channel, [headers(Mode.STREAMED)], 1)
    assert r.immediate_response.status.code == 500
    assert b"FULL_DUPLEX_STREAMED" in r.immediate_response.body


async def test_unknown_mode_number_500_not_a_crash(channel: grpc.aio.Channel) -> None:
    """A body mode this build does not know (a newer Envoy) is answered, not raised."""
    (r,) = await exchange(channel, [headers(99)], 1)
    assert r.immediate_response.status.code == 500
    assert b"unknown mode 99" in r.immediate_response.body


async def test_unexpected_failure_answers_500() -> None:
    class Broken(BodyRouter):
        async def run(self, read: Reader, write: object, eof: object) -> None:
            await read()  # fail while processing the first message
            raise RuntimeError("boom")

    server = BbrServer(Broken(), host="127.0.0.1", port=0)
    port = await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            (r,) = await exchange(ch, [headers(None)], 1)
        assert r.immediate_response.status.code == 500
        assert b"body-based routing failed" in r.immediate_response.body
    finally:
        await server.stop(0)


async def test_trailers_end_the_body(channel: grpc.aio.Channel) -> None:
    payload = b'{"model": "t"}'
    replies = await exchange(
        channel,
        [
            headers(Mode.FULL_DUPLEX_STREAMED),
            body(payload, eos=False),
            pb.ProcessingRequest(request_trailers=pb.HttpTrailers()),
        ],
        3,
    )
    assert set_header(replies[0].request_headers.response) == {"x-gateway-model-name": "t"}
    sr = replies[1].request_body.response.body_mutation.streamed_response
    assert sr.body == payload and not sr.end_of_stream
    assert replies[2].WhichOneof("response") == "request_trailers"


async def test_health(channel: grpc.aio.Channel) -> None:
    stub = health_pb2_grpc.HealthStub(channel)
    for svc in ("", "envoy.service.ext_proc.v3.ExternalProcessor", "liveness", "readiness"):
        r = await stub.Check(health_pb2.HealthCheckRequest(service=svc))
        assert r.status == health_pb2.HealthCheckResponse.SERVING


def test_model_from_body() -> None:
    assert model_from_body(b'{"model": "a/b:c"}') == "a/b:c"
    with pytest.raises(BadRequest):
        model_from_body(b'{"model": "' + b"x" * 600 + b'"}')
    with pytest.raises(BadRequest):
        model_from_body(b'{"model": "  "}')


async def test_tls_serving() -> None:
    from epp.server.tls import self_signed

    key, cert = self_signed()
    server = BbrServer(
        BodyRouter(),
        host="127.0.0.1",
        port=0,
        credentials=grpc.ssl_server_credentials([(key, cert)]),
    )
    port = await server.start()
    try:
        creds = grpc.ssl_channel_credentials(root_certificates=cert)
        async with grpc.aio.secure_channel(f"127.0.0.1:{port}", creds) as ch:
            replies = await exchange(
                ch, [headers(Mode.FULL_DUPLEX_STREAMED), body(b'{"model": "tls"}')], 2
            )
            assert set_header(replies[0].request_headers.response) == {
                "x-gateway-model-name": "tls"
            }
    finally:
        await server.stop(0)
