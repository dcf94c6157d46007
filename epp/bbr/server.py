"""Body-based routing (BBR): an ext_proc server that copies the request's JSON
``model`` into a header, so HTTPRoute rules can send each model to its own pool.

One gateway in front of several InferencePools (one per base model) cannot route on
the model name: it lives in the body, and route matching only sees headers. BBR runs
as an ext_proc filter *before* the pools' EPPs: it buffers the body, reads ``model``
and answers with a header mutation setting ``x-gateway-model-name: <model>`` plus
``clear_route_cache``, so Envoy re-matches the route with the new header.

Per stream (one HTTP request), by the request body mode Envoy announces in
``ProcessingRequest.protocol_config`` (``--default-body-mode`` when absent):

* ``FULL_DUPLEX_STREAMED``: the headers answer is held until the body is complete,
  then sent (mutation + ``clear_route_cache``), then the body is re-sent as
  ``streamed_response`` chunks of at most 62,000 bytes (the last marks end of stream);
* ``BUFFERED``/``BUFFERED_PARTIAL``: the headers are answered at once (only stripping a
  client-supplied model header) and the mutation rides on the body answer, which
  leaves the body unchanged;
* other modes cannot see a whole body: answered with a 500 naming the misconfiguration.

A request without a body passes through with any client-supplied model header
removed (clients never steer routing with it). A body that is not a JSON object
with a non-empty string ``model`` (at most 512 printable characters) gets a 400 JSON
``ImmediateResponse``; a body over ``max_body_bytes`` gets a 413. Response-path
messages, should Envoy send them, are passed through untouched.

This server is deliberately small and separate from the EPP; it reuses only the EPP's
error types, its ``ImmediateResponse`` builder (``epp.handlers``) and its JSON body
check (``epp.requestcontrol.parse.json_object``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio  # type: ignore[attr-defined]

from epp.errors import BadRequest, EppError, Internal, PayloadTooLarge
from epp.handlers import CHUNK_LIMIT, immediate_response
from epp.requestcontrol.parse import json_object
from pdroute.protocol.headers import MODEL_NAME

log = logging.getLogger(__name__)

_EOF: object = grpc.aio.EOF  # type: ignore[attr-defined]
MODEL_HEADER = MODEL_NAME
SERVICE_NAME = "envoy.service.ext_proc.v3.ExternalProcessor"
DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024
MAX_MODEL_CHARS = 512

_Mode = processing_mode_pb2.ProcessingMode
FULL_DUPLEX = _Mode.FULL_DUPLEX_STREAMED
BUFFERED = _Mode.BUFFERED
_BUFFERED_MODES = (_Mode.BUFFERED, _Mode.BUFFERED_PARTIAL)
_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD

Reader = Callable[[], Awaitable[Any]]
Writer = Callable[[pb.ProcessingResponse], Awaitable[None]]


def model_from_body(body: bytes) -> str:
    """The request's ``model``; raises :class:`BadRequest` with a client-facing reason."""
    doc = json_object(body, expected="a JSON object with a 'model' field")
    model = doc.get("model")
    if not isinstance(model, str) or not model.strip():
        raise BadRequest("request body has no 'model' string")
    if len(model) > MAX_MODEL_CHARS or any(ord(c) < 0x20 or ord(c) == 0x7F for c in model):
        raise BadRequest("'model' is too long or contains control characters")
    return model


def _mode_name(mode: int) -> str:
    """The body mode's name; protobuf enums are open, so a newer Envoy may send a
    value this build does not know (its number is then reported)."""
    try:
        return str(_Mode.BodySendMode.Name(mode))  # type: ignore[arg-type]
    except ValueError:
        return f"unknown mode {mode}"


def _set_header(name: str, value: str) -> pb.HeaderMutation:
    return pb.HeaderMutation(
        set_headers=[
            base_pb2.HeaderValueOption(
                header=base_pb2.HeaderValue(key=name, raw_value=value.encode()),
                append_action=_OVERWRITE,
            )
        ]
    )


def chunked(body: bytes, *, end: bool = True) -> list[pb.ProcessingResponse]:
    """``body`` as request-body ``streamed_response`` messages of <= CHUNK_LIMIT bytes."""
    chunks = [body[i : i + CHUNK_LIMIT] for i in range(0, len(body), CHUNK_LIMIT)] or [b""]
    last = len(chunks) - 1
    return [
        pb.ProcessingResponse(
            request_body=pb.BodyResponse(
                response=pb.CommonResponse(
                    body_mutation=pb.BodyMutation(
                        streamed_response=pb.StreamedBodyResponse(
                            body=c, end_of_stream=end and i == last
                        )
                    )
                )
            )
        )
        for i, c in enumerate(chunks)
    ]


@dataclass
class _Stream:
    mode: int
    resp_mode: int
    size: int = 0
    done: bool = False


class BodyRouter:
    """The per-stream state machine; transport-independent (``read``/``write``)."""

    def __init__(
        self,
        *,
        header_name: str = MODEL_HEADER,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        default_mode: int = FULL_DUPLEX,
    ) -> None:
        self.header_name = header_name.lower()
        self.max_body_bytes = max_body_bytes
        self.default_mode = default_mode

    async def run(self, read: Reader, write: Writer, eof: object) -> None:
        s: _Stream | None = None
        chunks: list[bytes] = []
        while True:
            msg = await read()
            if msg is eof or msg is None:
                return
            kind = msg.WhichOneof("request")
            if kind == "request_headers":
                s = self._start(msg)
                if msg.request_headers.end_of_stream or s.mode == _Mode.NONE:
                    await write(self._strip_only())
                    s.done = True
                elif s.mode in _BUFFERED_MODES:
                    await write(self._strip_only())
                elif s.mode != FULL_DUPLEX:
                    await write(
                        immediate_response(
                            Internal(
                                "bbr needs request_body_mode BUFFERED or FULL_DUPLEX_STREAMED, "
                                f"got {_mode_name(s.mode)}"
                            )
                        )
                    )
                    return
            elif kind == "request_body":
                if s is None or s.done:
                    # Envoy only sends a body after headers; stay transparent.
                    await write(pb.ProcessingResponse(request_body=pb.BodyResponse()))
                    continue
                part = msg.request_body
                s.size += len(part.body)
                if s.size > self.max_body_bytes:
                    await write(
                        immediate_response(
                            PayloadTooLarge(f"request body exceeds {self.max_body_bytes} bytes")
                        )
                    )
                    return
                chunks.append(part.body)
                if part.end_of_stream or s.mode in _BUFFERED_MODES:
                    body = b"".join(chunks)
                    chunks = []
                    s.done = True
                    if s.mode in _BUFFERED_MODES and not part.end_of_stream:
                        await write(
                            immediate_response(
                                PayloadTooLarge("request body exceeds the proxy's buffer")
                            )
                        )
                        return
                    if not await self._route(s, body, write, end=True):
                        return
            elif kind == "request_trailers":
                if s is not None and not s.done and s.mode == FULL_DUPLEX:
                    # The body ended with trailers (no end_of_stream on the last chunk).
                    body = b"".join(chunks)
                    chunks = []
                    s.done = True
                    if not await self._route(s, body, write, end=False):
                        return
                await write(pb.ProcessingResponse(request_trailers=pb.TrailersResponse()))
            elif kind == "response_headers":
                await write(pb.ProcessingResponse(response_headers=pb.HeadersResponse()))
            elif kind == "response_body":
                await write(self._echo_response_body(s, msg.response_body))
            elif kind == "response_trailers":
                await write(pb.ProcessingResponse(response_trailers=pb.TrailersResponse()))

    def _start(self, msg: pb.ProcessingRequest) -> _Stream:
        if msg.HasField("protocol_config"):
            pc = msg.protocol_config
            return _Stream(mode=pc.request_body_mode, resp_mode=pc.response_body_mode)
        return _Stream(mode=self.default_mode, resp_mode=_Mode.NONE)

    def _strip_only(self) -> pb.ProcessingResponse:
        return pb.ProcessingResponse(
            request_headers=pb.HeadersResponse(
                response=pb.CommonResponse(
                    header_mutation=pb.HeaderMutation(remove_headers=[self.header_name])
                )
            )
        )

    async def _route(self, s: _Stream, body: bytes, write: Writer, *, end: bool) -> bool:
        try:
            model = model_from_body(body)
        except EppError as err:
            await write(immediate_response(err))
            return False
        common = pb.CommonResponse(
            header_mutation=_set_header(self.header_name, model), clear_route_cache=True
        )
        if s.mode == FULL_DUPLEX:
            await write(pb.ProcessingResponse(request_headers=pb.HeadersResponse(response=common)))
            for resp in chunked(body, end=end):
                await write(resp)
        else:
            await write(pb.ProcessingResponse(request_body=pb.BodyResponse(response=common)))
        return True

    @staticmethod
    def _echo_response_body(s: _Stream | None, part: pb.HttpBody) -> pb.ProcessingResponse:
        if s is not None and s.resp_mode == FULL_DUPLEX:
            return pb.ProcessingResponse(
                response_body=pb.BodyResponse(
                    response=pb.CommonResponse(
                        body_mutation=pb.BodyMutation(
                            streamed_response=pb.StreamedBodyResponse(
                                body=part.body, end_of_stream=part.end_of_stream
                            )
                        )
                    )
                )
            )
        return pb.ProcessingResponse(response_body=pb.BodyResponse())


class _Servicer(pb_grpc.ExternalProcessorServicer):  # type: ignore[misc]
    def __init__(self, router: BodyRouter) -> None:
        self._router = router

    async def Process(  # noqa: N802 - gRPC method name
        self,
        request_iterator: object,
        context: grpc.aio.ServicerContext[pb.ProcessingRequest, pb.ProcessingResponse],
    ) -> None:
        try:
            await self._router.run(context.read, context.write, _EOF)
        except asyncio.CancelledError:
            raise
        except Exception:  # one bad stream must not go unreported or take others down
            log.exception("bbr stream failed")
            with contextlib.suppress(Exception):
                await context.write(immediate_response(Internal("body-based routing failed")))


class BbrServer:
    """The BBR gRPC server: ext_proc + gRPC health on one port."""

    def __init__(
        self,
        router: BodyRouter,
        *,
        host: str = "0.0.0.0",
        port: int = 9004,
        credentials: grpc.ServerCredentials | None = None,
    ) -> None:
        self.router = router
        self._host = host
        self._port = port
        self._credentials = credentials
        self._server: grpc.aio.Server | None = None
        self._health = health_aio.HealthServicer()
        self.port = 0

    async def start(self) -> int:
        limit = self.router.max_body_bytes + (1 << 20)
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", limit),
            ]
        )
        pb_grpc.add_ExternalProcessorServicer_to_server(_Servicer(self.router), server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        addr = f"{self._host}:{self._port}"
        if self._credentials is not None:
            self.port = server.add_secure_port(addr, self._credentials)
        else:
            self.port = server.add_insecure_port(addr)
        await server.start()
        for svc in ("", "liveness", "readiness", SERVICE_NAME):
            await self._health.set(svc, health_pb2.HealthCheckResponse.SERVING)
        self._server = server
        log.info("bbr listening on %s:%d", self._host, self.port)
        return self.port

    async def stop(self, grace_s: float | None = 5.0) -> None:
        if self._server is None:
            return
        for svc in ("", "readiness", SERVICE_NAME):
            await self._health.set(svc, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self._server.stop(grace_s)
        self._server = None

    async def wait(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()
