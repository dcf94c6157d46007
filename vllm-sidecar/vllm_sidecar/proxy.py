"""The P/D sidecar: an aiohttp reverse proxy in front of the decode pod's vLLM.

Request path (one coroutine per request, no shared mutable state but metrics)::

    client/Envoy --POST /v1/completions + x-prefiller-host-port: P--> sidecar
        1. strip x-prefiller-host-port; first value of a comma list is the target
        2. SSRF guard: P must be a pool member (Allowlist), else 403
        3. prefill leg:  POST http(s)://P<same path>  (stream off, limits 1,
           kv_transfer_params = do_remote_decode)   -- retried on 502/503/504/connect
        4. decode leg:   POST local vLLM  (original body + P's kv_transfer_params)
        5. stream the decode answer back chunk by chunk, rewriting
           usage.prompt_tokens_details.cached_tokens to the prefiller's count

Without the header, or for any other path, the request is reverse-proxied to
the local vLLM unchanged (response streamed, never buffered). Client-supplied
``kv_transfer_params`` are removed from completion requests by default: they
would let a caller make the local vLLM open NIXL connections to any host.

Failure policy for the prefill leg (``on_prefill_failure``):

* ``local`` (default): decode the original request locally, as if no prefiller
  had been chosen; the client still gets an answer, ``fallbacks`` counts it.
* ``error``: answer with a JSON error carrying the prefiller's status (or 502 for
  connection failures / unusable answers, 504 for timeouts).

Bounded memory: request bodies (``max_request_bytes``, 413 above), prefill
answers (``max_prefill_answer_bytes``), non-streamed decode answers buffered for
the cached-token rewrite (``max_rewrite_bytes``; larger ones pass unmodified),
and at most one partial SSE line per stream. Upstream connections are pooled
with a bounded connector.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import aiohttp
import orjson
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from pdroute.protocol.headers import PREFILLER_HOST_PORT, REQUEST_ID
from vllm_sidecar.allowlist import Allowlist, normalize_host_port
from vllm_sidecar.legs import (
    PD_PATHS,
    BadPrefillAnswer,
    PrefillAnswer,
    SseRewriter,
    decode_body,
    parse_prefill_answer,
    prefill_body,
    rewrite_json_answer,
)
from vllm_sidecar.metrics import SidecarMetrics

log = logging.getLogger("vllm_sidecar")

FailurePolicy = Literal["local", "error"]

#: RFC 9110 hop-by-hop headers plus the ones the proxy recomputes.
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)
_RETRY_STATUSES = frozenset({502, 503, 504})
_READ_CHUNK = 64 * 1024


@dataclass(frozen=True, slots=True)
class SidecarConfig:
    """Everything the proxy needs; built by :mod:`vllm_sidecar.cmd` from flags."""

    decoder_url: str = "http://127.0.0.1:8200"
    prefiller_scheme: Literal["http", "https"] = "http"
    #: ``ssl`` argument for the prefill leg: None = default verification, False =
    #: no verification, or a context (custom CA).
    prefiller_ssl: ssl.SSLContext | bool | None = None
    decoder_ssl: ssl.SSLContext | bool | None = None
    prefill_timeout_s: float = 300.0
    connect_timeout_s: float = 5.0
    #: Longest silence between two chunks of the decode answer (and before headers).
    decode_read_timeout_s: float = 600.0
    prefill_max_retries: int = 2
    prefill_retry_backoff_s: float = 0.2
    on_prefill_failure: FailurePolicy = "local"
    max_request_bytes: int = 32 * 1024 * 1024
    max_prefill_answer_bytes: int = 16 * 1024 * 1024
    max_rewrite_bytes: int = 64 * 1024 * 1024
    #: Keep client-sent kv_transfer_params (only for trusted clients).
    allow_client_kv_transfer_params: bool = False
    max_connections: int = 1024


class HttpError(Exception):
    """Answered to the client as ``{"error": {...}}`` with ``status``."""

    def __init__(self, status: int, message: str, code: str, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.extra = extra


def error_response(status: int, message: str, code: str, **extra: Any) -> web.Response:
    err: dict[str, Any] = {"message": message, "type": code, "code": status}
    err.update(extra)
    return web.Response(
        status=status, body=orjson.dumps({"error": err}), content_type="application/json"
    )


class _PrefillFailure(Exception):
    def __init__(self, reason: str, status: int, message: str, body: Any = None) -> None:
        super().__init__(message)
        self.reason = reason  # metric label
        self.status = status  # HTTP status for the error policy
        self.message = message
        self.body = body  # the prefiller's error body, if any (bounded)


def _forward_headers(headers: CIMultiDictProxy[str], *, drop_encoding: bool) -> CIMultiDict[str]:
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        low = name.lower()
        if low in _HOP_BY_HOP or low == PREFILLER_HOST_PORT:
            continue
        if drop_encoding and low == "accept-encoding":
            continue
        out.add(name, value)
    return out


def _response_headers(headers: Mapping[str, str], *, keep_length: bool) -> CIMultiDict[str]:
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        low = name.lower()
        if low in _HOP_BY_HOP and not (keep_length and low == "content-length"):
            continue
        if low in ("server", "date"):
            continue
        out.add(name, value)
    return out


async def _read_bounded(stream: aiohttp.StreamReader, limit: int) -> bytes | None:
    """The whole stream, or None as soon as it exceeds ``limit`` bytes."""
    parts: list[bytes] = []
    size = 0
    while True:
        chunk = await stream.read(_READ_CHUNK)
        if not chunk:
            return b"".join(parts)
        size += len(chunk)
        if size > limit:
            return None
        parts.append(chunk)


def _error_payload(raw: bytes) -> Any:
    raw = raw[:65536]
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return raw.decode("utf-8", "replace")


class SidecarProxy:
    """Owns the upstream client sessions; :meth:`build_app` gives the aiohttp app."""

    def __init__(
        self,
        config: SidecarConfig,
        allowlist: Allowlist,
        metrics: SidecarMetrics | None = None,
        *,
        clock: Callable[[], float] = time.perf_counter,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.config = config
        self.allowlist = allowlist
        self.metrics = metrics or SidecarMetrics()
        self.clock = clock
        self.sleep = sleep
        self.draining = False
        self._decode_session: aiohttp.ClientSession | None = None
        self._prefill_session: aiohttp.ClientSession | None = None
        self._decoder_url = config.decoder_url.rstrip("/")

    # -- lifecycle -------------------------------------------------------------
    async def start(self) -> None:
        c = self.config
        self._decode_session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=c.max_connections, ssl=_ssl_arg(c.decoder_ssl)),
            auto_decompress=False,  # pass bytes through as the client negotiated them
            skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
        )
        self._prefill_session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=c.max_connections, ssl=_ssl_arg(c.prefiller_ssl)),
            skip_auto_headers=("User-Agent", "Content-Type"),
        )

    async def close(self) -> None:
        for s in (self._decode_session, self._prefill_session):
            if s is not None:
                await s.close()
        self._decode_session = self._prefill_session = None

    def build_app(self) -> web.Application:
        # Bodies are read by the handler with its own limit (JSON 413), so the
        # framework limit is only a backstop for code paths that call read().
        app = web.Application(
            client_max_size=self.config.max_request_bytes + 1,
            middlewares=[self._errors_middleware],
        )
        app.router.add_get("/health", self.health)
        app.router.add_route("*", "/{tail:.*}", self.handle)

        async def _on_startup(_: web.Application) -> None:
            if self._decode_session is None:
                await self.start()

        async def _on_cleanup(_: web.Application) -> None:
            await self.close()

        app.on_startup.append(_on_startup)
        app.on_cleanup.append(_on_cleanup)
        return app

    def build_metrics_app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/metrics", self.metrics_handler)
        return app

    # -- small handlers --------------------------------------------------------
    async def health(self, request: web.Request) -> web.Response:
        if self.draining:
            return error_response(503, "sidecar is shutting down", "draining")
        return web.Response(body=b'{"status":"ok"}', content_type="application/json")

    async def metrics_handler(self, request: web.Request) -> web.Response:
        body = generate_latest(self.metrics.registry)
        resp = web.Response(body=body)
        resp.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return resp

    @web.middleware
    async def _errors_middleware(
        self,
        request: web.Request,
        handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    ) -> web.StreamResponse:
        try:
            return await handler(request)
        except HttpError as e:
            return error_response(e.status, e.message, e.code, **e.extra)
        except web.HTTPException as e:
            if e.status >= 400:
                return error_response(e.status, e.reason, "http_error")
            raise
        except (asyncio.CancelledError, ConnectionResetError):
            raise
        except Exception:
            log.exception("unexpected error on %s %s", request.method, request.path)
            return error_response(500, "internal sidecar error", "internal_error")

    # -- the proxy -------------------------------------------------------------
    async def _read_body(self, request: web.Request) -> bytes:
        limit = self.config.max_request_bytes
        if request.content_length is not None and request.content_length > limit:
            self.metrics.rejected.labels("too_large").inc()
            raise HttpError(413, f"request body larger than {limit} bytes", "request_too_large")
        body = await _read_bounded(request.content, limit)
        if body is None:
            self.metrics.rejected.labels("too_large").inc()
            raise HttpError(413, f"request body larger than {limit} bytes", "request_too_large")
        return body

    async def handle(self, request: web.Request) -> web.StreamResponse:
        t0 = self.clock()
        body = await self._read_body(request)
        kind = PD_PATHS.get(request.path) if request.method == "POST" else None
        prefill_values = request.headers.getall(PREFILLER_HOST_PORT, [])

        if kind is None:
            headers = _forward_headers(request.headers, drop_encoding=False)
            return await self._decode(
                request, headers, body, t0=t0, upstream_waited=0.0, mode="passthrough", answer=None
            )

        doc: dict[str, Any] | None = None
        # JSON may spell the key with escapes ("kv_transfer\u005fparams"): any escape
        # means "parse and look", not "skip" (a byte search alone could be bypassed).
        if not self.config.allow_client_kv_transfer_params and (
            b"kv_transfer_params" in body or b"\\u" in body
        ):
            doc = self._parse_json(body)
            if "kv_transfer_params" in doc:
                del doc["kv_transfer_params"]
                body = orjson.dumps(doc)

        if not prefill_values:
            headers = _forward_headers(request.headers, drop_encoding=False)
            return await self._decode(
                request, headers, body, t0=t0, upstream_waited=0.0, mode="local", answer=None
            )

        first = ",".join(prefill_values).split(",")[0]
        target = normalize_host_port(first)
        if target is None:
            self.metrics.rejected.labels("bad_header").inc()
            raise HttpError(
                400, f"invalid {PREFILLER_HOST_PORT} value {first.strip()[:100]!r}", "bad_header"
            )
        if not self.allowlist.allows(target):
            self.metrics.rejected.labels("ssrf").inc()
            log.warning("refused prefill target %s (not a pool member)", target)
            raise HttpError(
                403,
                "Forbidden: prefill target not allowed by SSRF protection",
                "prefill_target_forbidden",
            )
        if doc is None:
            doc = self._parse_json(body)

        headers = _forward_headers(request.headers, drop_encoding=True)
        if REQUEST_ID not in headers:
            headers[REQUEST_ID] = str(uuid.uuid4())

        t_prefill = self.clock()
        try:
            answer = await self._prefill(target, request.path_qs, headers, kind, doc)
        except _PrefillFailure as f:
            waited = self.clock() - t_prefill
            log.warning("prefill leg to %s failed: %s", target, f.message)
            if self.config.on_prefill_failure == "error":
                self.metrics.requests.labels("pd", str(f.status)).inc()
                extra: dict[str, Any] = {"prefiller": target}
                if f.body is not None:
                    extra["prefiller_error"] = f.body
                raise HttpError(
                    f.status, f"prefill leg failed: {f.message}", "prefill_failed", **extra
                ) from None
            self.metrics.fallbacks.labels(f.reason).inc()
            local_headers = _forward_headers(request.headers, drop_encoding=False)
            local_headers[REQUEST_ID] = headers[REQUEST_ID]
            return await self._decode(
                request,
                local_headers,
                body,
                t0=t0,
                upstream_waited=waited,
                mode="fallback",
                answer=None,
            )
        waited = self.clock() - t_prefill
        decode_bytes = orjson.dumps(decode_body(doc, answer.kv_transfer_params))
        return await self._decode(
            request, headers, decode_bytes, t0=t0, upstream_waited=waited, mode="pd", answer=answer
        )

    def _parse_json(self, body: bytes) -> dict[str, Any]:
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError as e:
            self.metrics.rejected.labels("bad_json").inc()
            raise HttpError(400, f"request body is not valid JSON: {e}", "invalid_json") from None
        if not isinstance(doc, dict):
            self.metrics.rejected.labels("bad_json").inc()
            raise HttpError(400, "request body must be a JSON object", "invalid_json")
        return doc

    async def _prefill(
        self,
        target: str,
        path_qs: str,
        headers: CIMultiDict[str],
        kind: str,
        doc: dict[str, Any],
    ) -> PrefillAnswer:
        assert self._prefill_session is not None, "SidecarProxy.start() not called"
        c = self.config
        url = f"{c.prefiller_scheme}://{target}{path_qs}"
        payload = orjson.dumps(prefill_body(kind, doc))
        leg_headers = CIMultiDict(headers)
        leg_headers["Content-Type"] = "application/json"
        timeout = aiohttp.ClientTimeout(total=c.prefill_timeout_s, sock_connect=c.connect_timeout_s)
        attempt = 0
        while True:
            t_leg = self.clock()
            failure: _PrefillFailure
            try:
                async with self._prefill_session.post(
                    url, data=payload, headers=leg_headers, timeout=timeout, allow_redirects=False
                ) as resp:
                    if 200 <= resp.status < 300:
                        raw = await _read_bounded(resp.content, c.max_prefill_answer_bytes)
                        self.metrics.leg_duration.labels("prefill").observe(self.clock() - t_leg)
                        if raw is None:
                            self.metrics.leg_failures.labels("prefill", "bad_answer").inc()
                            raise _PrefillFailure(
                                "bad_answer", 502, f"prefiller {target} answer too large"
                            )
                        try:
                            return parse_prefill_answer(raw)
                        except BadPrefillAnswer as e:
                            self.metrics.leg_failures.labels("prefill", "bad_answer").inc()
                            raise _PrefillFailure(
                                "bad_answer", 502, f"prefiller {target}: {e}"
                            ) from None
                    err = await _read_bounded(resp.content, 65536)
                    failure = _PrefillFailure(
                        f"http_{resp.status}",
                        resp.status,
                        f"prefiller {target} returned HTTP {resp.status}",
                        _error_payload(err) if err else None,
                    )
            except _PrefillFailure:
                raise
            except TimeoutError:
                failure = _PrefillFailure(
                    "timeout", 504, f"prefiller {target} timed out after {c.prefill_timeout_s}s"
                )
            except aiohttp.ClientConnectionError as e:
                failure = _PrefillFailure(
                    "connect", 502, f"cannot reach prefiller {target}: {e.__class__.__name__}"
                )
            except aiohttp.ClientError as e:
                failure = _PrefillFailure("client_error", 502, f"prefiller {target}: {e}")
            self.metrics.leg_duration.labels("prefill").observe(self.clock() - t_leg)
            self.metrics.leg_failures.labels("prefill", failure.reason).inc()
            retryable = (
                failure.reason in ("timeout", "connect") or failure.status in _RETRY_STATUSES
            )
            if not retryable or attempt >= c.prefill_max_retries:
                raise failure
            attempt += 1
            self.metrics.prefill_retries.inc()
            await self.sleep(c.prefill_retry_backoff_s * (2 ** (attempt - 1)))

    async def _decode(
        self,
        request: web.Request,
        headers: CIMultiDict[str],
        body: bytes,
        *,
        t0: float,
        upstream_waited: float,
        mode: str,
        answer: PrefillAnswer | None,
    ) -> web.StreamResponse:
        assert self._decode_session is not None, "SidecarProxy.start() not called"
        c = self.config
        url = self._decoder_url + request.path_qs
        if answer is not None:
            headers["Content-Type"] = "application/json"
        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=c.connect_timeout_s, sock_read=c.decode_read_timeout_s
        )
        t_leg = self.clock()
        try:
            upstream_cm = self._decode_session.request(
                request.method,
                url,
                data=body if body or request.method not in ("GET", "HEAD") else None,
                headers=headers,
                timeout=timeout,
                allow_redirects=False,
            )
            up = await upstream_cm.__aenter__()
        except TimeoutError:
            self.metrics.leg_failures.labels("decode", "timeout").inc()
            self.metrics.requests.labels(mode, "504").inc()
            raise HttpError(504, "local vLLM timed out", "decoder_timeout") from None
        except aiohttp.ClientError as e:
            self.metrics.leg_failures.labels("decode", "connect").inc()
            self.metrics.requests.labels(mode, "502").inc()
            raise HttpError(
                502, f"cannot reach local vLLM: {e.__class__.__name__}", "decoder_unreachable"
            ) from None
        try:
            now = self.clock()
            decode_wait = now - t_leg
            self.metrics.leg_duration.labels("decode").observe(decode_wait)
            self.metrics.time_to_headers.labels(mode).observe(now - t0)
            self.metrics.added_latency.observe(max(0.0, now - t0 - upstream_waited - decode_wait))
            self.metrics.requests.labels(mode, str(up.status)).inc()
            if up.status >= 400:
                self.metrics.leg_failures.labels("decode", f"http_{up.status}").inc()
            ctype = up.headers.get("Content-Type", "")
            if answer is not None and 200 <= up.status < 300:
                if ctype.startswith("text/event-stream"):
                    return await self._stream(request, up, SseRewriter(answer.cached_tokens))
                if "json" in ctype:
                    raw = await _read_bounded(up.content, c.max_rewrite_bytes)
                    if raw is not None:
                        out = rewrite_json_answer(raw, answer.cached_tokens)
                        resp = web.Response(
                            status=up.status,
                            body=out,
                            headers=_response_headers(up.headers, keep_length=False),
                        )
                        return resp
                    log.warning("decode answer over %d bytes: not rewritten", c.max_rewrite_bytes)
            return await self._stream(request, up, None)
        finally:
            await upstream_cm.__aexit__(None, None, None)

    async def _stream(
        self, request: web.Request, up: aiohttp.ClientResponse, rewriter: SseRewriter | None
    ) -> web.StreamResponse:
        keep_length = rewriter is None and up.content_length is not None
        resp = web.StreamResponse(
            status=up.status,
            reason=up.reason,
            headers=_response_headers(up.headers, keep_length=keep_length),
        )
        await resp.prepare(request)
        writing = False
        try:
            async for chunk in up.content.iter_any():
                out = rewriter.feed(chunk) if rewriter is not None else chunk
                if out:
                    writing = True
                    await resp.write(out)
                    writing = False
            if rewriter is not None:
                tail = rewriter.flush()
                if tail:
                    writing = True
                    await resp.write(tail)
        except (aiohttp.ClientError, ConnectionError, TimeoutError) as e:
            # Headers are gone: the only honest signal left is a truncated body. Leaving
            # this block closes the upstream response, so vLLM aborts the generation.
            reason = "client_gone" if writing else "stream_broken"
            self.metrics.leg_failures.labels("decode", reason).inc()
            log.info("decode stream ended early (%s): %s", reason, e.__class__.__name__)
            if request.transport is not None:
                request.transport.close()
            return resp
        await resp.write_eof()
        return resp


def _ssl_arg(value: ssl.SSLContext | bool | None) -> ssl.SSLContext | bool:
    if value is None:
        return True
    return value
