"""OpenAI-API request parsing and response shapes, as vLLM 0.32 serves them.

Pure functions: a decoded JSON body in, a :class:`Parsed` request or an
:class:`ApiError` out; response dicts built from a finished (or streaming)
:class:`~pdroute.sim.engine.SimRequest`. Error bodies follow vLLM's
``ErrorResponse``: ``{"error": {"message", "type", "param", "code"}}`` with
``code`` = the HTTP status.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from pdroute.sim.tokenizer import Tokenizer, render_chat

_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    404: "NotFoundError",
    429: "RateLimitError",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
}


class ApiError(Exception):
    def __init__(
        self, status: int, message: str, param: str | None = None, etype: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.etype = etype

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, self.param, self.etype)


def error_body(
    status: int, message: str, param: str | None = None, etype: str | None = None
) -> dict[str, Any]:
    return {
        "error": {
            "message": message,
            "type": etype or _TYPES.get(status, "InternalServerError"),
            "param": param,
            "code": status,
        }
    }


def validation_error(field: str, kind: str, msg: str, value: Any) -> ApiError:
    """A request-schema error, shaped like vLLM's (FastAPI/pydantic) ``Bad Request``."""
    loc = f"body.{field}" if field else "body"
    detail = f"{{'type': '{kind}', 'loc': '{loc}', 'msg': '{msg}', 'input': {str(value)[:100]!r}}}"
    return ApiError(400, f"1 validation error:\n  {detail}", loc, "Bad Request")


@dataclass
class Parsed:
    kind: str  # "completion" | "chat" | "responses"
    model: str
    lora: str | None
    prompt_ids: list[int]
    max_tokens: int
    stop_after: int | None
    stream: bool
    include_usage: bool
    continuous_usage: bool
    kv_transfer_params: dict[str, Any] | None
    seed: int
    n: int = 1
    raw: dict[str, Any] = field(default_factory=dict)


def _int_field(body: dict[str, Any], key: str, minimum: int) -> int | None:
    v = body.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise validation_error(key, "int_type", "Input should be a valid integer", v)
    if v < minimum:
        raise ApiError(400, f"{key} must be at least {minimum}, got {v}.", key)
    return v


def resolve_model(body: dict[str, Any], base: str, loras: set[str]) -> tuple[str, str | None]:
    model = body.get("model")
    if model is None:
        return base, None
    if not isinstance(model, str):
        raise validation_error("model", "string_type", "Input should be a valid string", model)
    if model == base:
        return model, None
    if model in loras:
        return model, model
    aliases = ", ".join([base, *sorted(loras)])
    raise ApiError(404, f"The model `{model}` does not exist. Valid aliases: {aliases}.", "model")


def _prompt_ids(body: dict[str, Any], tok: Tokenizer) -> list[int]:
    prompt = body.get("prompt")
    add_special = body.get("add_special_tokens", True) is not False
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return tok.encode(prompt, add_special)
    if (
        isinstance(prompt, list)
        and prompt
        and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)
    ):
        if any(t < 0 or t >= tok.vocab_size for t in prompt):
            raise ApiError(400, f"Token id out of vocabulary (size {tok.vocab_size})", "prompt")
        return list(prompt)
    if prompt is None:
        raise validation_error("prompt", "missing", "Field required", None)
    if isinstance(prompt, list) and len(prompt) > 1:
        raise ApiError(400, "batched prompts are not supported by the simulator", "prompt")
    raise validation_error("prompt", "string_type", "Input should be a valid string", prompt)


def _chat_ids(body: dict[str, Any], tok: Tokenizer, key: str = "messages") -> list[int]:
    messages = body.get(key)
    if key == "input" and isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    if not isinstance(messages, list):
        raise validation_error(key, "list_type", "Input should be a valid list", messages)
    if not messages:
        raise ApiError(
            400,
            "Cannot apply chat template to an empty conversation. Provide at least one message.",
        )
    try:
        text = render_chat(messages, body.get("add_generation_prompt", True) is not False)
    except ValueError as e:
        raise ApiError(400, str(e), key) from None
    return tok.encode(text, add_special_tokens=False)


def parse(
    kind: str,
    body: Any,
    *,
    tok: Tokenizer,
    base_model: str,
    loras: set[str],
    max_model_len: int,
) -> Parsed:
    if not isinstance(body, dict):
        raise validation_error(
            "", "model_attributes_type", "Input should be a valid dictionary", body
        )
    model, lora = resolve_model(body, base_model, loras)
    if kind == "completion":
        ids = _prompt_ids(body, tok)
        max_tokens = _int_field(body, "max_tokens", 1)
        if max_tokens is None:
            max_tokens = 16  # vLLM CompletionRequest default
    elif kind == "chat":
        ids = _chat_ids(body, tok)
        max_tokens = _int_field(body, "max_completion_tokens", 1)
        if max_tokens is None:
            max_tokens = _int_field(body, "max_tokens", 1)
    else:
        ids = _chat_ids(body, tok, "input")
        max_tokens = _int_field(body, "max_output_tokens", 1)
    n = _int_field(body, "n", 1) or 1
    if n != 1:
        raise ApiError(400, "n > 1 is not supported by the simulator", "n")
    plen = len(ids)
    if plen > max_model_len:
        seen = max_model_len + 1  # vLLM stops counting one past the limit
        raise ApiError(
            400,
            f"This model's maximum context length is {max_model_len} tokens. However, your "
            f"prompt contains at least {seen} input tokens, which exceeds this limit even "
            "without any output tokens. Please reduce the length of the input prompt. "
            f"(parameter=input_tokens, value={seen})",
            "input_tokens",
        )
    seed = _int_field(body, "seed", 0)
    content_seed = hash(tuple(ids)) & 0x7FFFFFFF if seed is None else seed
    stop_after: int | None = None
    if max_tokens is None:
        max_tokens = max_model_len - plen
        if body.get("ignore_eos") is not True:
            stop_after = 8 + content_seed % 56  # a deterministic "EOS" position
    elif max_tokens > max_model_len:
        raise ApiError(
            400,
            f"max_tokens={max_tokens} cannot be greater than max_model_len={max_model_len}. "
            f"Please request fewer output tokens. (parameter=max_tokens, value={max_tokens})",
            "max_tokens",
        )
    elif plen + max_tokens > max_model_len:
        raise ApiError(
            400,
            f"'max_tokens' or 'max_completion_tokens' is too large: {max_tokens}. This model's "
            f"maximum context length is {max_model_len} tokens and your request has {plen} "
            f"input tokens ({max_tokens} > {max_model_len} - {plen}).",
            "max_tokens",
        )
    so = body.get("stream_options")
    stream = body.get("stream") is True
    if so is not None and not isinstance(so, dict):
        raise validation_error(
            "stream_options", "model_type", "Input should be a valid dictionary", so
        )
    include_usage = bool(so and so.get("include_usage"))
    continuous = bool(so and so.get("continuous_usage_stats"))
    ktp = body.get("kv_transfer_params")
    if ktp is not None and not isinstance(ktp, dict):
        raise validation_error(
            "kv_transfer_params", "dict_type", "Input should be a valid dictionary", ktp
        )
    return Parsed(
        kind=kind,
        model=model,
        lora=lora,
        prompt_ids=ids,
        max_tokens=max_tokens,
        stop_after=stop_after,
        stream=stream,
        include_usage=include_usage,
        continuous_usage=continuous,
        kv_transfer_params=ktp,
        seed=content_seed,
        n=n,
        raw=body,
    )


def make_usage(prompt: int, completion: int, cached: int, *, chat: bool) -> dict[str, Any]:
    """Non-streaming ``usage`` as vLLM 0.32 returns it."""
    return {
        "prompt_tokens": prompt,
        "total_tokens": prompt + completion,
        "completion_tokens": completion,
        "prompt_tokens_details": {
            "cached_tokens": cached,
            "created_cache_tokens": 0 if chat else None,
            "multimodal_tokens": None,
        },
        "completion_tokens_details": None,
    }


def stream_usage(prompt: int, completion: int, cached: int, *, chat: bool) -> dict[str, Any]:
    """``usage`` of the final streaming chunk (vLLM omits the null fields there)."""
    details: dict[str, Any] = {"cached_tokens": cached}
    if chat:
        details["created_cache_tokens"] = 0
    return {
        "prompt_tokens": prompt,
        "total_tokens": prompt + completion,
        "completion_tokens": completion,
        "prompt_tokens_details": details,
    }


def completion_body(
    rid: str,
    model: str,
    text: str,
    *,
    finish: str | None,
    usage: dict[str, Any],
    kv_transfer_params: dict[str, Any] | None,
    fingerprint: str,
) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "text": text,
                "logprobs": None,
                "finish_reason": finish,
                "stop_reason": None,
                "token_ids": None,
                "prompt_logprobs": None,
                "prompt_token_ids": None,
                "routed_experts": None,
            }
        ],
        "service_tier": None,
        "system_fingerprint": fingerprint,
        "usage": usage,
        "metrics": None,
        "kv_transfer_params": kv_transfer_params,
        "ec_transfer_params": None,
    }


def chat_body(
    rid: str,
    model: str,
    text: str,
    *,
    finish: str | None,
    usage: dict[str, Any],
    kv_transfer_params: dict[str, Any] | None,
    fingerprint: str,
) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": text,
                    "refusal": None,
                    "annotations": None,
                    "audio": None,
                    "function_call": None,
                    "reasoning": None,
                },
                "logprobs": None,
                "finish_reason": finish,
                "stop_reason": None,
                "token_ids": None,
                "routed_experts": None,
            }
        ],
        "service_tier": None,
        "system_fingerprint": fingerprint,
        "usage": usage,
        "prompt_logprobs": None,
        "prompt_token_ids": None,
        "prompt_text": None,
        "metrics": None,
        "kv_transfer_params": kv_transfer_params,
        "ec_transfer_params": None,
    }


def responses_body(
    rid: str,
    model: str,
    text: str,
    *,
    finish: str | None,
    prompt: int,
    completion: int,
    cached: int,
) -> dict[str, Any]:
    now = int(time.time())
    return {
        "id": rid,
        "object": "response",
        "created_at": now,
        "model": model,
        "status": "completed" if finish == "stop" else "incomplete",
        "incomplete_details": None if finish == "stop" else {"reason": "max_output_tokens"},
        "output": [
            {
                "id": f"msg_{rid[5:]}",
                "type": "message",
                "role": "assistant",
                "status": "completed",
                "content": [{"type": "output_text", "text": text, "annotations": []}],
            }
        ],
        "usage": {
            "input_tokens": prompt,
            "input_tokens_details": {"cached_tokens": cached},
            "output_tokens": completion,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt + completion,
        },
    }


def completion_chunk(
    rid: str, created: int, model: str, text: str, finish: str | None
) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "text": text,
                "logprobs": None,
                "finish_reason": finish,
                "stop_reason": None,
                "token_ids": None,
                "prompt_token_ids": None,
            }
        ],
    }


def chat_role_chunk(rid: str, created: int, model: str) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "delta": {"role": "assistant", "content": ""},
                "logprobs": None,
                "finish_reason": None,
            }
        ],
        "prompt_token_ids": None,
        "prompt_text": None,
    }


def chat_chunk(rid: str, created: int, model: str, text: str, finish: str | None) -> dict[str, Any]:
    choice: dict[str, Any] = {
        "index": 0,
        "delta": {"content": text},
        "logprobs": None,
        "finish_reason": finish,
        "token_ids": None,
    }
    if finish is not None:
        choice["stop_reason"] = None
    return {
        "id": rid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [choice],
    }


def usage_chunk(rid: str, created: int, model: str, obj: str, u: dict[str, Any]) -> dict[str, Any]:
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [], "usage": u}
