"""Fakes and ext_proc message builders for the stream-handler tests."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from epp.handlers import StreamHandler
from epp.requestcontrol.api import IncomingRequest, ResponseInfo

Mode = processing_mode_pb2.ProcessingMode


@dataclass
class FakeDecision:
    endpoints: list[str]
    set_headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes | None = None
    extra_response_headers: Mapping[str, str] = field(default_factory=dict)
    finished: list[ResponseInfo] = field(default_factory=list)
    model: str = "m"
    routing_metadata: dict[str, str] = field(default_factory=dict)

    def response_headers(self, info: ResponseInfo) -> Mapping[str, str]:
        return self.extra_response_headers

    def finish(self, info: ResponseInfo) -> None:
        self.finished.append(info)


@dataclass
class FakeDirector:
    """Routes to ``endpoints``; ``behaviour(request)`` may raise or return a decision."""

    endpoints: list[str] = field(default_factory=lambda: ["10.0.0.1:8000", "10.0.0.2:8000"])
    behaviour: Callable[[IncomingRequest], FakeDecision | None] | None = None
    needs_response_body: bool = False
    requests: list[IncomingRequest] = field(default_factory=list)
    bodyless: list[IncomingRequest] = field(default_factory=list)
    decisions: list[FakeDecision] = field(default_factory=list)
    delay_s: float = 0.0

    async def route(self, request: IncomingRequest) -> FakeDecision:
        self.requests.append(request)
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        d = self.behaviour(request) if self.behaviour else None
        d = d or FakeDecision(list(self.endpoints))
        self.decisions.append(d)
        return d

    def route_bodyless(self, request: IncomingRequest) -> FakeDecision:
        self.bodyless.append(request)
        d = FakeDecision(list(self.endpoints[:1]))
        self.decisions.append(d)
        return d

    def ready(self) -> bool:
        return True


def headers_msg(
    headers: Mapping[str, str],
    *,
    eos: bool = False,
    mode: int | None = Mode.FULL_DUPLEX_STREAMED,
    resp_mode: int = Mode.NONE,
    metadata: base_pb2.Metadata | None = None,
) -> pb.ProcessingRequest:
    hm = base_pb2.HeaderMap(
        headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in headers.items()]
    )
    msg = pb.ProcessingRequest(request_headers=pb.HttpHeaders(headers=hm, end_of_stream=eos))
    if mode is not None:
        msg.protocol_config.request_body_mode = mode  # type: ignore[assignment]
        msg.protocol_config.response_body_mode = resp_mode  # type: ignore[assignment]
    if metadata is not None:
        msg.metadata_context.CopyFrom(metadata)
    return msg


def body_msg(data: bytes, *, eos: bool = False) -> pb.ProcessingRequest:
    return pb.ProcessingRequest(request_body=pb.HttpBody(body=data, end_of_stream=eos))


def response_headers_msg(
    headers: Mapping[str, str], *, eos: bool = False, served: str | None = None
) -> pb.ProcessingRequest:
    hm = base_pb2.HeaderMap(
        headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in headers.items()]
    )
    msg = pb.ProcessingRequest(response_headers=pb.HttpHeaders(headers=hm, end_of_stream=eos))
    if served is not None:
        msg.metadata_context.filter_metadata["envoy.lb"].fields[
            "x-gateway-destination-endpoint-served"
        ].string_value = served
    return msg


REQUEST_HEADERS = {
    ":method": "POST",
    ":path": "/v1/completions",
    "content-type": "application/json",
}


@dataclass
class Harness:
    director: FakeDirector
    handler: StreamHandler
    stub: Any

    def open(self) -> Any:
        return self.stub.Process()


async def read_n(call: Any, n: int, limit_s: float = 5.0) -> list[pb.ProcessingResponse]:
    out = []
    for _ in range(n):
        out.append(await asyncio.wait_for(call.read(), limit_s))
    return out
