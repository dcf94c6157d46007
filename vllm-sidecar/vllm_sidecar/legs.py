"""Pure request/response shaping for the two legs of a disaggregated request.

Nothing here does I/O; the proxy (:mod:`vllm_sidecar.proxy`) calls these on the
hot path, so they work on already-parsed ``dict`` bodies and on raw bytes of
server-sent events, and never buffer more than one SSE line.

The prefill leg is the client's request with generation cut to one token and
NixlConnector's "please keep the KV for a remote decoder" parameters
(:data:`pdroute.protocol.kv_transfer.PREFILL_REQUEST_PARAMS`); streaming is
turned off because the sidecar needs the JSON answer's ``kv_transfer_params``.
The decode leg is the client's original request plus the prefill answer's
``kv_transfer_params``, passed verbatim (vLLM may add fields in any release).

``usage.prompt_tokens_details.cached_tokens`` in the decode answer counts the
tokens pulled over NIXL as "cached"; the client should instead see how much of
its prompt the *prefiller* found in its prefix cache, so the proxy rewrites
that one number in the JSON answer or in each SSE ``data:`` event.
"""

from __future__ import annotations

import copy
from typing import Any, Final

import orjson

from pdroute.protocol.kv_transfer import PREFILL_REQUEST_PARAMS

#: The request kinds the sidecar splits into prefill + decode; any other path is
#: reverse-proxied to the local vLLM unchanged.
COMPLETIONS: Final = "completions"
CHAT: Final = "chat"
RESPONSES: Final = "responses"
MESSAGES: Final = "messages"  # Anthropic Messages API (vLLM serves it, with kv_transfer_params)
PD_PATHS: Final[dict[str, str]] = {
    "/v1/completions": COMPLETIONS,
    "/v1/chat/completions": CHAT,
    "/v1/responses": RESPONSES,
    "/v1/messages": MESSAGES,
}

#: Token-limit fields forced to 1 on the prefill leg, per API. ``max_tokens`` is set
#: even when absent (vLLM's default would generate up to the context length);
#: the others only when the client sent them (vLLM rejects min > max).
_ALWAYS_ONE: Final[dict[str, tuple[str, ...]]] = {
    COMPLETIONS: ("max_tokens",),
    CHAT: ("max_tokens", "max_completion_tokens"),
    RESPONSES: ("max_output_tokens",),
    MESSAGES: ("max_tokens",),
}
_ONE_IF_PRESENT: Final[tuple[str, ...]] = (
    "max_tokens",
    "max_completion_tokens",
    "min_tokens",
    "max_output_tokens",
)


def prefill_body(kind: str, request: dict[str, Any]) -> dict[str, Any]:
    """The prefill leg's body: ``stream`` off, ``stream_options`` gone, limits 1.

    ``request`` is not modified (the decode leg needs the original).
    """
    body = dict(request)  # shallow: only top-level keys change
    body["stream"] = False
    body.pop("stream_options", None)
    for name in _ONE_IF_PRESENT:
        if name in body:
            body[name] = 1
    for name in _ALWAYS_ONE.get(kind, ()):
        body[name] = 1
    body["kv_transfer_params"] = copy.deepcopy(PREFILL_REQUEST_PARAMS)
    return body


def decode_body(request: dict[str, Any], kv_transfer_params: dict[str, Any]) -> dict[str, Any]:
    """The decode leg's body: the client's request + the prefiller's params, verbatim."""
    body = dict(request)
    body["kv_transfer_params"] = kv_transfer_params
    return body


class PrefillAnswer:
    """What the decode leg needs from a successful prefill answer."""

    __slots__ = ("cached_tokens", "kv_transfer_params")

    def __init__(self, kv_transfer_params: dict[str, Any], cached_tokens: int) -> None:
        self.kv_transfer_params = kv_transfer_params
        self.cached_tokens = cached_tokens


class BadPrefillAnswer(ValueError):
    """The prefiller answered 2xx but not with usable ``kv_transfer_params``."""


def parse_prefill_answer(raw: bytes) -> PrefillAnswer:
    """Extract ``kv_transfer_params`` and the prefiller's cached-token count.

    A prefiller without a KV connector answers ``"kv_transfer_params": null``;
    that (or a missing field) is an error: decoding with it would silently
    recompute the whole prompt on the decode pod.
    """
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise BadPrefillAnswer(f"prefill answer is not JSON: {e}") from None
    if not isinstance(doc, dict):
        raise BadPrefillAnswer("prefill answer is not a JSON object")
    params = doc.get("kv_transfer_params")
    if not isinstance(params, dict) or not params:
        raise BadPrefillAnswer(
            "prefill answer has no kv_transfer_params (is the prefiller's vLLM started "
            "with --kv-transfer-config NixlConnector?)"
        )
    cached = _cached_tokens_of(doc)
    if cached is None:
        alt = params.get("remote_prefill_cached_tokens")
        cached = alt if isinstance(alt, int) and not isinstance(alt, bool) else 0
    return PrefillAnswer(params, cached)


def _cached_tokens_of(doc: dict[str, Any]) -> int | None:
    usage = doc.get("usage")
    if not isinstance(usage, dict):
        return None
    for details_key in ("prompt_tokens_details", "input_tokens_details"):
        details = usage.get(details_key)
        if isinstance(details, dict):
            value = details.get("cached_tokens")
            if isinstance(value, int) and not isinstance(value, bool):
                return value
    return None


def _rewrite_usage(obj: dict[str, Any], cached_tokens: int) -> bool:
    """Set ``cached_tokens`` wherever the decode answer reports it. True if changed."""
    changed = False
    usages = [obj.get("usage")]
    response = obj.get("response")  # responses API streaming events nest the response
    if isinstance(response, dict):
        usages.append(response.get("usage"))
    for usage in usages:
        if not isinstance(usage, dict):
            continue
        for details_key in ("prompt_tokens_details", "input_tokens_details"):
            details = usage.get(details_key)
            if isinstance(details, dict) and "cached_tokens" in details:
                details["cached_tokens"] = cached_tokens
                changed = True
    return changed


def rewrite_json_answer(raw: bytes, cached_tokens: int) -> bytes:
    """Rewrite a non-streamed decode answer; anything unparsable passes unchanged."""
    if b"cached_tokens" not in raw:
        return raw
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return raw
    if not isinstance(doc, dict) or not _rewrite_usage(doc, cached_tokens):
        return raw
    return orjson.dumps(doc)


class SseRewriter:
    """Rewrites ``cached_tokens`` in an SSE stream, chunk by chunk.

    Invariant: ``_pending`` holds only the bytes after the last newline seen
    (at most one partial line, capped at ``max_line`` bytes; a longer line is
    passed through untouched). Every complete line is emitted by the
    :meth:`feed` call that completed it, so the stream is never delayed by
    more than one partial line.
    """

    __slots__ = ("_cached_tokens", "_max_line", "_passthrough_line", "_pending")

    def __init__(self, cached_tokens: int, max_line: int = 1 << 20) -> None:
        self._cached_tokens = cached_tokens
        self._max_line = max_line
        self._pending = b""
        self._passthrough_line = False

    def feed(self, chunk: bytes) -> bytes:
        data = self._pending + chunk if self._pending else chunk
        cut = data.rfind(b"\n")
        if cut < 0:
            if self._passthrough_line:
                return data
            if len(data) > self._max_line:
                self._passthrough_line = True
                self._pending = b""
                return data
            self._pending = data
            return b""
        complete, self._pending = data[: cut + 1], data[cut + 1 :]
        if self._passthrough_line:
            # The first line in ``complete`` is the tail of an over-long line.
            first_end = complete.find(b"\n") + 1
            head, complete = complete[:first_end], complete[first_end:]
            self._passthrough_line = False
            return head + self._rewrite_lines(complete)
        return self._rewrite_lines(complete)

    def flush(self) -> bytes:
        rest, self._pending = self._pending, b""
        if self._passthrough_line:
            self._passthrough_line = False
            return rest
        return self._rewrite_lines(rest) if rest else b""

    def _rewrite_lines(self, block: bytes) -> bytes:
        if b"cached_tokens" not in block:
            return block
        lines = block.split(b"\n")
        for i, line in enumerate(lines):
            if line.startswith(b"data:") and b"cached_tokens" in line:
                lines[i] = self._rewrite_data_line(line)
        return b"\n".join(lines)

    def _rewrite_data_line(self, line: bytes) -> bytes:
        payload = line[5:]
        cr = payload.endswith(b"\r")
        if cr:
            payload = payload[:-1]
        try:
            doc = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return line
        if not isinstance(doc, dict) or not _rewrite_usage(doc, self._cached_tokens):
            return line
        return b"data: " + orjson.dumps(doc) + (b"\r" if cr else b"")
