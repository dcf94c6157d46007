"""Token usage from a response body seen in chunks, with bounded memory.

Only used when the director asks for response bodies. Two shapes:

* non-streaming JSON (``{"usage": {...}}``): the body is kept up to
  :data:`MAX_JSON_BYTES` and parsed once at the end; larger bodies are not parsed;
* server-sent events (``data: {...}`` lines): complete lines are scanned as they
  arrive and the last ``usage`` object wins (vLLM sends it in the final event when
  the client asked for ``stream_options.include_usage``). An incomplete line is
  carried to the next chunk, capped at :data:`MAX_LINE_BYTES`, so events split
  across ext_proc chunks are still seen.

Invariant: at most ``MAX_JSON_BYTES + MAX_LINE_BYTES`` bytes are held per response.
"""

from __future__ import annotations

from typing import Any

import orjson

MAX_JSON_BYTES = 1 << 20
MAX_LINE_BYTES = 1 << 16


class UsageScanner:
    __slots__ = (
        "_buf",
        "_carry",
        "_overflow",
        "cached_tokens",
        "completion_tokens",
        "prompt_tokens",
        "sse",
    )

    def __init__(self, *, sse: bool) -> None:
        self.sse = sse
        self._buf = bytearray()
        self._carry = b""
        self._overflow = False
        self.prompt_tokens: int | None = None
        self.completion_tokens: int | None = None
        self.cached_tokens: int | None = None

    def feed(self, chunk: bytes, end: bool) -> None:
        if self.sse:
            self._feed_sse(chunk, end)
            return
        if not self._overflow:
            if len(self._buf) + len(chunk) > MAX_JSON_BYTES:
                self._overflow = True
                self._buf.clear()
            else:
                self._buf += chunk
        if end and not self._overflow and self._buf:
            self._take_json(bytes(self._buf))
            self._buf.clear()

    def _feed_sse(self, chunk: bytes, end: bool) -> None:
        data = self._carry + chunk if self._carry else chunk
        lines = data.split(b"\n")
        last = lines.pop()
        self._carry = last if len(last) <= MAX_LINE_BYTES else b""
        for line in lines:
            self._take_line(line)
        if end and self._carry:
            self._take_line(self._carry)
            self._carry = b""

    def _take_line(self, line: bytes) -> None:
        if not line.startswith(b"data:") or b'"usage"' not in line:
            return
        self._take_json(line[5:].strip())

    def _take_json(self, raw: bytes) -> None:
        try:
            doc = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return
        if not isinstance(doc, dict):
            return
        usage = doc.get("usage")
        if usage is None and isinstance(doc.get("response"), dict):  # Responses API
            usage = doc["response"].get("usage")
        if isinstance(usage, dict):
            self._take_usage(usage)

    def _take_usage(self, usage: dict[str, Any]) -> None:
        prompt = usage.get("prompt_tokens", usage.get("input_tokens"))
        completion = usage.get("completion_tokens", usage.get("output_tokens"))
        if isinstance(prompt, int):
            self.prompt_tokens = prompt
        if isinstance(completion, int):
            self.completion_tokens = completion
        details = usage.get("prompt_tokens_details") or usage.get("input_tokens_details")
        if isinstance(details, dict) and isinstance(details.get("cached_tokens"), int):
            self.cached_tokens = details["cached_tokens"]
