"""Request body parsing for scheduling: API kind, model, and the prompt text.

The prompt text is what the prefix index hashes, so it must be deterministic for
equal requests: chat messages are serialized with orjson (compact, key order as
sent), completions use the prompt string (lists joined), the Responses API uses
``instructions`` then ``input``, embeddings their ``input``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from epp.errors import BadRequest

CHAT = "chat/completions"
COMPLETIONS = "completions"
RESPONSES = "responses"
EMBEDDINGS = "embeddings"

#: Path suffixes in match order (``/chat/completions`` before ``/completions``).
_SUFFIXES = (
    ("/chat/completions", CHAT),
    ("/completions", COMPLETIONS),
    ("/responses", RESPONSES),
    ("/embeddings", EMBEDDINGS),
)


#: Paths seen -> API kind (a handful in practice; cleared when it reaches the bound).
_API_BY_PATH: dict[str, str] = {}
_API_CACHE_MAX = 256


def detect_api(path: str) -> str:
    """API kind from the request path (query ignored); unknown paths are completions."""
    api = _API_BY_PATH.get(path)
    if api is None:
        api = _detect_api(path)
        if len(_API_BY_PATH) >= _API_CACHE_MAX:
            _API_BY_PATH.clear()
        _API_BY_PATH[path] = api
    return api


def _detect_api(path: str) -> str:
    p = path.split("?", 1)[0].rstrip("/")
    for suffix, api in _SUFFIXES:
        if p.endswith(suffix):
            return api
    return COMPLETIONS


@dataclass(slots=True)
class ParsedRequest:
    api: str
    model: str
    prompt: str
    body: dict[str, Any]
    #: Token count when the prompt is given as token ids.
    prompt_tokens: int | None = None
    cache_salt: str = ""


def _dump(value: Any) -> str:
    try:
        return orjson.dumps(value).decode("utf-8")
    except (TypeError, orjson.JSONEncodeError) as e:  # pragma: no cover - parsed JSON re-encodes
        raise BadRequest(f"cannot serialize request content: {e}") from e


def _is_token_ids(v: list[Any]) -> bool:
    return bool(v) and all(isinstance(t, int) and not isinstance(t, bool) for t in v)


def _prompt_text(value: Any, field: str) -> tuple[str, int | None]:
    """Text (and token count when given as ids) of a ``prompt``/``input`` value."""
    if value is None:
        return "", None
    if isinstance(value, str):
        return value, None
    if isinstance(value, list):
        if not value:
            return "", None
        if all(isinstance(v, str) for v in value):
            return "\n".join(value), None
        if _is_token_ids(value):
            return _dump(value), len(value)
        if all(isinstance(v, list) and _is_token_ids(v) for v in value):
            return _dump(value), sum(len(v) for v in value)
    raise BadRequest(f"'{field}' must be a string, a list of strings, or token ids")


def json_object(body: bytes, *, expected: str = "a JSON object") -> dict[str, Any]:
    """The body as a JSON object (orjson); raises BadRequest naming the problem."""
    if not body:
        raise BadRequest(f"request body is empty; expected {expected}")
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise BadRequest(f"request body is not valid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise BadRequest("request body must be a JSON object")
    return doc


def parse_body(body: bytes, path: str) -> ParsedRequest:
    """Parse and check an OpenAI-style request body (raises BadRequest)."""
    doc = json_object(body)
    model = doc.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("request body needs a non-empty string 'model'")
    api = detect_api(path)
    prompt_tokens: int | None = None
    if api == CHAT:
        messages = doc.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadRequest("'messages' must be a non-empty list")
        prompt = _dump(messages)
    elif api == RESPONSES:
        instructions = doc.get("instructions")
        if instructions is not None and not isinstance(instructions, str):
            raise BadRequest("'instructions' must be a string")
        inp = doc.get("input")
        text = inp if isinstance(inp, str) else ("" if inp is None else _dump(inp))
        prompt = f"{instructions}\n{text}" if instructions else text
    elif api == EMBEDDINGS:
        prompt, prompt_tokens = _prompt_text(doc.get("input"), "input")
    else:
        prompt, prompt_tokens = _prompt_text(doc.get("prompt"), "prompt")
    salt = doc.get("cache_salt")
    if salt is not None and not isinstance(salt, str):
        raise BadRequest("'cache_salt' must be a string")
    return ParsedRequest(api, model, prompt, doc, prompt_tokens, salt or "")


def header_int(headers: Mapping[str, str], name: str, default: int) -> int:
    raw = headers.get(name)
    if raw is None or raw == "":
        return default
    try:
        v = int(raw.strip())
    except ValueError:
        raise BadRequest(f"header {name} must be an integer, got {raw[:40]!r}") from None
    if not -(1 << 31) <= v < (1 << 31):
        raise BadRequest(f"header {name} is out of range")
    return v
