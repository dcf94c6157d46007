"""The ext_proc stream state machine: one HTTP request per gRPC ``Process`` stream.

Envoy opens one ``Process`` stream per HTTP request and sends, in order, the
request headers, the request body chunks, then (after the upstream answers) the
response headers and, if configured, the response body. :class:`StreamHandler`
turns that into one :meth:`Director.route` call and the answers Envoy needs.

Request phase, ``FULL_DUPLEX_STREAMED`` (the recommended mode):

1. request headers: lower-case names, values from ``raw_value``; client-sent
   system-owned headers (:func:`pdroute.protocol.headers.is_system_owned`) are
   dropped from what the director sees and removed upstream; ``x-request-id`` is
   generated when absent. No answer yet: the headers answer is *held* until the
   body is complete (FULL_DUPLEX allows it), because the route depends on the body.
   Requests whose headers carry ``end_of_stream`` (no body) are routed at once with
   :meth:`Director.route_bodyless`.
2. body chunks are appended while the running total is checked against the cap
   (413 as soon as it is passed, and at the headers already when ``content-length``
   announces more), so an oversize body is never held whole.
3. at end of stream: route, then send the headers answer (header mutation with
   ``x-gateway-destination-endpoint`` = ordered ``ip:port`` list, the same value in
   dynamic metadata ``envoy.lb``, ``clear_route_cache``, ``content-length`` of the
   body as forwarded, the decision's headers) followed by the body re-sent as
   ``streamed_response`` chunks of at most :data:`CHUNK_LIMIT` bytes, the last one
   with ``end_of_stream``.

``BUFFERED`` request bodies also work: Envoy then waits for the headers answer
before sending the body, so headers are answered at once (system headers removed)
and the routing mutation rides on the body answer. The mode is read from
``ProcessingRequest.protocol_config``.

Response phase: response headers get the decision's response headers and feed
:class:`ResponseInfo` (status, served endpoint from ``envoy.lb`` metadata or the
``upstream.address`` attribute). Response bodies are only seen when the Envoy
filter sends them (``response_body_mode``, see ``pdroute.stack.envoy``); they are
echoed unchanged and scanned for token usage when the director needs it. When
Envoy skips response headers too (``response_header_mode: SKIP``, fewer messages),
the response end is the stream's end: ``finish`` runs when Envoy closes the stream.

Errors: every :class:`epp.errors.EppError` becomes an ``ImmediateResponse`` with
its status and a JSON body ``{"error": {"message", "type", "code"}}``; anything
unexpected becomes a 500 of the same shape and is logged. Nothing escapes
:meth:`StreamHandler.run` but cancellation, and ``RoutingDecision.finish`` is
called exactly once per routed request, also when the client goes away.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import orjson
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.type.v3 import http_status_pb2
from google.protobuf import struct_pb2

from epp import metrics
from epp.errors import EppError, Internal, NoReadyEndpoint, PayloadTooLarge
from epp.handlers.usage import UsageScanner
from epp.requestcontrol.api import Director, IncomingRequest, ResponseInfo, RoutingDecision
from pdroute.protocol import headers as hdr
from pdroute.protocol.headers import is_system_owned

log = logging.getLogger(__name__)

#: Largest body chunk re-sent to Envoy in one message (GIE's ``BodyByteLimit``).
CHUNK_LIMIT = 62_000
DEFAULT_MAX_REQUEST_BODY_BYTES = 16 * 1024 * 1024
#: Distinct model names used as metric labels; the rest count as "other".
MAX_MODEL_LABELS = 64

_Mode = processing_mode_pb2.ProcessingMode
_FULL_DUPLEX = _Mode.FULL_DUPLEX_STREAMED
_BUFFERED = _Mode.BUFFERED
_BUFFERED_PARTIAL = _Mode.BUFFERED_PARTIAL
_NONE = _Mode.NONE
_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD

_PH_HEADERS = 0  # waiting for request headers
_PH_BODY = 1  # collecting the request body
_PH_RESPONSE = 2  # routed; response messages follow
_PH_CLOSED = 3  # an immediate response was sent

Reader = Callable[[], Awaitable[Any]]
Writer = Callable[[pb.ProcessingResponse], Awaitable[None]]
Clock = Callable[[], float]


def _new_request_id() -> str:
    return str(uuid.uuid4())


def error_body(err: EppError) -> bytes:
    """The JSON error body clients see (OpenAI-style envelope)."""
    return orjson.dumps({"error": {"message": err.message, "type": err.code, "code": err.status}})


def immediate_response(err: EppError) -> pb.ProcessingResponse:
    return pb.ProcessingResponse(
        immediate_response=pb.ImmediateResponse(
            status=http_status_pb2.HttpStatus(code=err.status),  # type: ignore[arg-type]
            headers=pb.HeaderMutation(
                set_headers=[_hvo("content-type", "application/json")],  # type: ignore[list-item]
            ),
            body=error_body(err),
            details=err.code,
        )
    )


# Responses are built from nested dicts: upb converts them in C, about 2.5x faster
# than nesting message constructors, and this is the per-request hot path.
_Json = dict[str, Any]


def _hvo(name: str, value: str) -> _Json:
    """A ``HeaderValueOption`` that overwrites (or adds) ``name``."""
    return {"header": {"key": name, "raw_value": value.encode()}, "append_action": _OVERWRITE}


def _struct_str(s: struct_pb2.Struct, key: str) -> str | None:
    v = s.fields.get(key)
    if v is None:
        return None
    kind = v.WhichOneof("kind")
    if kind == "string_value":
        return str(v.string_value)
    if kind == "list_value" and v.list_value.values:
        return str(v.list_value.values[0].string_value)
    return None


def subset_hint(md: base_pb2.Metadata) -> list[str] | None:
    """``envoy.lb.subset_hint`` endpoints, or None when the proxy sent no hint."""
    ns = md.filter_metadata.get(hdr.SUBSET_HINT_NAMESPACE)
    if ns is None:
        return None
    v = ns.fields.get(hdr.DESTINATION_ENDPOINT_SUBSET)
    if v is None:
        return None
    kind = v.WhichOneof("kind")
    if kind == "list_value":
        return [x.string_value for x in v.list_value.values if x.string_value]
    if kind == "string_value":
        return [p.strip() for p in v.string_value.split(",") if p.strip()]
    return []


def served_endpoint(msg: pb.ProcessingRequest) -> str | None:
    """Where Envoy sent the request: ``envoy.lb`` metadata (EPP protocol), else the
    ``upstream.address`` attribute (see ``pdroute.stack.envoy``)."""
    ns = msg.metadata_context.filter_metadata.get(hdr.ENVOY_LB_NAMESPACE)
    if ns is not None:
        v = _struct_str(ns, hdr.DESTINATION_ENDPOINT_SERVED)
        if v:
            return v
    for attrs in msg.attributes.values():
        v = _struct_str(attrs, "upstream.address")
        if v:
            return v
    return None


class _ModelMetrics:
    """Per-model metric children, cached (``labels()`` is costly on the hot path).

    Invariant: at most ``limit`` distinct model names get their own series; the
    rest share ``other``, so a client sending random model names cannot grow the
    registry without bound.
    """

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._children: dict[str, tuple[Any, Any]] = {}

    def label(self, name: str) -> str:
        if name in self._children or len(self._children) < self._limit:
            return name
        return "other"

    def done(self, name: str) -> tuple[Any, Any]:
        """(requests counter, duration histogram) children for ``name``."""
        c = self._children.get(name)
        if c is None:
            label = self.label(name)
            c = self._children.get(label)
            if c is None:
                c = (
                    metrics.REQUESTS.labels(label),
                    metrics.REQUEST_DURATION.labels(label),
                )
                self._children[label] = c
        return c


def _model_of(decision: RoutingDecision | None) -> str:
    if decision is None:
        return ""
    for attr in ("model", "model_name"):
        v = getattr(decision, attr, None)
        if isinstance(v, str):
            return v
    return ""


class _Stream:
    """Per-stream state. Invariant: ``decision`` is finished at most once
    (``finished``); ``chunks`` holds at most the body cap."""

    __slots__ = (
        "buffered",
        "chunks",
        "decision",
        "finished",
        "headers",
        "info",
        "phase",
        "remove",
        "request_id",
        "resp_body_mode",
        "rid_generated",
        "scanner",
        "started",
        "subset",
        "total",
    )

    def __init__(self, started: float) -> None:
        self.phase = _PH_HEADERS
        self.buffered = False
        self.resp_body_mode: int | None = None
        self.headers: dict[str, str] = {}
        self.remove: list[str] = []
        self.request_id = ""
        self.rid_generated = False
        self.subset: list[str] | None = None
        self.chunks: list[bytes] = []
        self.total = 0
        self.decision: RoutingDecision | None = None
        self.info = ResponseInfo()
        self.scanner: UsageScanner | None = None
        self.finished = False
        self.started = started


class StreamHandler:
    """Runs ext_proc streams against one :class:`Director`. Stateless between
    streams; safe to share by all concurrent streams of a process."""

    def __init__(
        self,
        director: Director,
        *,
        max_request_body_bytes: int = DEFAULT_MAX_REQUEST_BODY_BYTES,
        honor_subset_hint: bool = True,
        clock: Clock = time.perf_counter,
        new_request_id: Callable[[], str] = _new_request_id,
    ) -> None:
        if max_request_body_bytes <= 0:
            raise ValueError("max_request_body_bytes must be positive")
        self._director = director
        # Fixed for the director's life (its plugins are): read once, not per request.
        self._needs_body = bool(director.needs_response_body)
        self._cap = max_request_body_bytes
        self._honor_subset = honor_subset_hint
        self._clock = clock
        self._new_rid = new_request_id
        self._model_metrics = _ModelMetrics(MAX_MODEL_LABELS)

    async def run(self, read: Reader, write: Writer, eof: object = None) -> None:
        """Serve one stream: ``read()`` returns the next request or ``eof``."""
        s = _Stream(self._clock())
        try:
            await self._loop(s, read, write, eof)
        except EppError as err:
            await self._reject(s, write, err)
        except Exception:
            log.exception("ext_proc stream failed (request id %s)", s.request_id or "-")
            if s.phase < _PH_RESPONSE:
                await self._reject(s, write, Internal("internal error in the endpoint picker"))
        finally:
            self._finish(s)

    # -- request phase -------------------------------------------------------------

    async def _loop(self, s: _Stream, read: Reader, write: Writer, eof: object) -> None:
        while True:
            msg = await read()
            if msg is eof or msg is None:
                return
            kind = msg.WhichOneof("request")
            if kind == "request_body":
                if s.phase != _PH_BODY:
                    continue  # a duplicate end_of_stream after routing: nothing to do
                body = msg.request_body
                if body.body:
                    s.total += len(body.body)
                    if s.total > self._cap:
                        raise PayloadTooLarge(
                            f"request body exceeds the limit of {self._cap} bytes"
                        )
                    s.chunks.append(body.body)
                if body.end_of_stream or body.end_of_stream_without_message or s.buffered:
                    await self._route(s, write)
            elif kind == "request_headers":
                if s.phase != _PH_HEADERS:
                    continue
                await self._on_request_headers(s, msg, write)
            elif kind == "response_headers":
                if await self._on_response_headers(s, msg, write):
                    # Nothing more will come on this stream: end it with the
                    # answer (one write, no wait for Envoy's half-close).
                    return
            elif kind == "response_body":
                await self._on_response_body(s, msg, write)
            elif kind == "request_trailers":
                if s.phase == _PH_BODY:
                    await self._route(s, write)
                await write(pb.ProcessingResponse(request_trailers=pb.TrailersResponse()))
            elif kind == "response_trailers":
                await write(pb.ProcessingResponse(response_trailers=pb.TrailersResponse()))
                self._finish(s)

    async def _on_request_headers(
        self, s: _Stream, msg: pb.ProcessingRequest, write: Writer
    ) -> None:
        req_mode = _FULL_DUPLEX
        if msg.HasField("protocol_config"):
            req_mode = msg.protocol_config.request_body_mode
            s.resp_body_mode = msg.protocol_config.response_body_mode
        hdrs = msg.request_headers
        headers = s.headers
        remove = s.remove
        content_length = ""
        for hv in hdrs.headers.headers:
            key = hv.key
            value = hv.raw_value.decode("utf-8", "replace") if hv.raw_value else hv.value
            # Every system-owned name starts with "x-" except content-length: test
            # the cheap prefix first (this loop runs for every request header).
            if (key[:2] == "x-" or key == "content-length") and is_system_owned(key):
                if key == "content-length":
                    content_length = value
                elif key not in remove:
                    remove.append(key)
                continue
            prev = headers.get(key)
            headers[key] = value if prev is None else f"{prev},{value}"
        rid = headers.get(hdr.REQUEST_ID)
        if not rid:
            rid = self._new_rid()
            headers[hdr.REQUEST_ID] = rid
            s.rid_generated = True
        s.request_id = rid
        if self._honor_subset:
            s.subset = subset_hint(msg.metadata_context)
        if content_length.isdigit() and int(content_length) > self._cap:
            raise PayloadTooLarge(f"request body exceeds the limit of {self._cap} bytes")

        if hdrs.end_of_stream or req_mode == _NONE:
            req = IncomingRequest(headers, b"", s.subset, rid)
            decision = self._director.route_bodyless(req)
            s.decision = decision
            endpoints = self._endpoints(decision)
            resp = pb.ProcessingResponse(
                request_headers={"response": self._routing_common(s, decision, endpoints, None)}
            )
            _set_lb_metadata(resp, endpoints, decision)
            await write(resp)
            s.phase = _PH_RESPONSE
            return
        if req_mode == _FULL_DUPLEX:
            s.phase = _PH_BODY  # the headers answer is held until the body is complete
            return
        if req_mode in (_BUFFERED, _BUFFERED_PARTIAL):
            # Envoy waits for this answer before it sends the buffered body.
            s.buffered = True
            s.phase = _PH_BODY
            await write(
                pb.ProcessingResponse(
                    request_headers={"response": {"header_mutation": {"remove_headers": remove}}}
                )
            )
            return
        raise Internal(
            f"ext_proc request_body_mode {_Mode.BodySendMode.Name(req_mode)} is not supported; "
            "configure FULL_DUPLEX_STREAMED or BUFFERED"
        )

    def _endpoints(self, decision: RoutingDecision) -> str:
        eps = decision.endpoints
        if not eps:
            raise NoReadyEndpoint("no endpoint available for this request")
        return ",".join(eps)

    def _routing_common(
        self,
        s: _Stream,
        decision: RoutingDecision,
        endpoints: str,
        body_len: int | None,
    ) -> _Json:
        set_headers = [_hvo(hdr.DESTINATION_ENDPOINT, endpoints)]
        own = {hdr.DESTINATION_ENDPOINT}
        for name, value in decision.set_headers.items():
            set_headers.append(_hvo(name, value))
            own.add(name)
        if s.rid_generated:
            set_headers.append(_hvo(hdr.REQUEST_ID, s.request_id))
        if body_len is not None:
            set_headers.append(_hvo("content-length", str(body_len)))
        mutation: _Json = {"set_headers": set_headers}
        if s.remove:
            mutation["remove_headers"] = [k for k in s.remove if k not in own]
        return {"header_mutation": mutation, "clear_route_cache": True}

    async def _route(self, s: _Stream, write: Writer) -> None:
        body = b"".join(s.chunks) if len(s.chunks) != 1 else s.chunks[0]
        s.chunks = []
        t0 = self._clock()
        decision = await self._director.route(
            IncomingRequest(s.headers, body, s.subset, s.request_id)
        )
        s.decision = decision
        endpoints = self._endpoints(decision)
        out = decision.body if decision.body is not None else body
        common = self._routing_common(s, decision, endpoints, len(out))
        if s.buffered:
            if decision.body is not None:
                common["body_mutation"] = {"body": out}
            resp = pb.ProcessingResponse(request_body={"response": common})
            _set_lb_metadata(resp, endpoints, decision)
            await write(resp)
        else:
            resp = pb.ProcessingResponse(request_headers={"response": common})
            _set_lb_metadata(resp, endpoints, decision)
            await write(resp)
            await _write_streamed(write, out, request=True)
        s.phase = _PH_RESPONSE
        metrics.REQUEST_PROCESSING.observe(self._clock() - t0)

    async def _reject(self, s: _Stream, write: Writer, err: EppError) -> None:
        s.phase = _PH_CLOSED
        s.chunks = []
        model = self._model_metrics.label(_model_of(s.decision))
        metrics.REQUEST_ERRORS.labels(model, str(err.status)).inc()
        if log.isEnabledFor(logging.DEBUG):
            log.debug("request %s rejected: %s %s", s.request_id, err.status, err.message)
        try:
            await write(immediate_response(err))
        except Exception:  # the stream is already broken; nothing more to tell Envoy
            log.debug("could not send the error response", exc_info=True)

    # -- response phase ------------------------------------------------------------

    async def _on_response_headers(
        self, s: _Stream, msg: pb.ProcessingRequest, write: Writer
    ) -> bool:
        """Answer the response headers; True when this was the stream's last message
        (no response body follows: ``end_of_stream`` or response body mode NONE)."""
        rh = msg.response_headers
        info = s.info
        headers: dict[str, str] = {}
        for hv in rh.headers.headers:
            headers[hv.key] = hv.raw_value.decode("utf-8", "replace") if hv.raw_value else hv.value
        status = headers.get(":status", "")
        info.status = int(status) if status.isdigit() else None
        info.headers = headers
        info.served_endpoint = served_endpoint(msg)
        common: _Json = {}
        decision = s.decision
        if decision is not None:
            try:
                extra: Mapping[str, str] = decision.response_headers(info)
            except Exception:
                log.exception("response_headers hook failed (request id %s)", s.request_id)
                extra = {}
            if extra:
                common["header_mutation"] = {"set_headers": [_hvo(k, v) for k, v in extra.items()]}
            if self._needs_body and not rh.end_of_stream:
                sse = headers.get("content-type", "").startswith("text/event-stream")
                s.scanner = UsageScanner(sse=sse)
        last = bool(rh.end_of_stream) or s.resp_body_mode == _NONE
        await write(pb.ProcessingResponse(response_headers={"response": common}))
        if last:
            # Nothing more will come. Answer first (Envoy holds the client's response
            # for it), report then: in the same step, before this process reads
            # anything else, so the next pick already sees this request finished.
            self._finish(s)
        return last

    async def _on_response_body(self, s: _Stream, msg: pb.ProcessingRequest, write: Writer) -> None:
        rb = msg.response_body
        end = rb.end_of_stream or rb.end_of_stream_without_message
        if s.scanner is not None:
            try:
                s.scanner.feed(rb.body, end)
            except Exception:
                log.exception("usage scan failed (request id %s)", s.request_id)
                s.scanner = None
        if end:
            self._finish(s)
        mode = s.resp_body_mode
        if mode == _FULL_DUPLEX or (mode is None and not s.buffered):
            await _write_streamed(write, rb.body, request=False, end=end)
        else:
            await write(pb.ProcessingResponse(response_body=pb.BodyResponse()))

    def _finish(self, s: _Stream) -> None:
        if s.finished:
            return
        s.finished = True
        decision = s.decision
        if decision is None:
            return
        info = s.info
        sc = s.scanner
        if sc is not None:
            info.prompt_tokens = sc.prompt_tokens
            info.completion_tokens = sc.completion_tokens
            info.cached_tokens = sc.cached_tokens
        try:
            decision.finish(info)
        except Exception:
            log.exception("finish hook failed (request id %s)", s.request_id)
        requests, duration = self._model_metrics.done(_model_of(decision))
        requests.inc()
        duration.observe(self._clock() - s.started)


def _set_lb_metadata(
    resp: pb.ProcessingResponse, endpoints: str, decision: RoutingDecision
) -> None:
    """``dynamic_metadata = {"envoy.lb": {"x-gateway-destination-endpoint": endpoints}}``
    plus the decision's ``routing_metadata`` (response headers known at routing time,
    e.g. ``x-session-token``, that the gateway copies into the response)."""
    fields = resp.dynamic_metadata.fields[hdr.ENVOY_LB_NAMESPACE].struct_value.fields
    fields[hdr.DESTINATION_ENDPOINT].string_value = endpoints
    extra: Mapping[str, str] | None = getattr(decision, "routing_metadata", None)
    if extra:
        for k, v in extra.items():
            fields[k].string_value = v


async def _write_streamed(write: Writer, body: bytes, *, request: bool, end: bool = True) -> None:
    """Send ``body`` as ``streamed_response`` chunks of at most CHUNK_LIMIT bytes;
    ``end`` marks the last one (an empty body is one empty chunk)."""
    n = len(body)
    pos = 0
    while True:
        nxt = pos + CHUNK_LIMIT
        last = nxt >= n
        chunk = body[pos:nxt] if (pos or not last) else body
        common = {
            "body_mutation": {"streamed_response": {"body": chunk, "end_of_stream": end and last}}
        }
        resp = (
            pb.ProcessingResponse(request_body={"response": common})
            if request
            else pb.ProcessingResponse(response_body={"response": common})
        )
        await write(resp)
        if last:
            return
        pos = nxt
