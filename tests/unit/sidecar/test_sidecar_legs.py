"""Pure leg shaping: prefill/decode bodies, prefill answers, cached_tokens rewrites."""

from __future__ import annotations

import copy

import orjson
import pytest
from vllm_sidecar.legs import (
    CHAT,
    COMPLETIONS,
    MESSAGES,
    PD_PATHS,
    RESPONSES,
    BadPrefillAnswer,
    SseRewriter,
    decode_body,
    parse_prefill_answer,
    prefill_body,
    rewrite_json_answer,
)

from pdroute.protocol.kv_transfer import PREFILL_REQUEST_PARAMS

VLLM_PARAMS = {
    "do_remote_prefill": True,
    "do_remote_decode": False,
    "remote_block_ids": [[1, 2, 3]],
    "remote_engine_id": "e1",
    "remote_request_id": "cmpl-1",
    "remote_host": "127.0.0.1",
    "remote_port": 15601,
    "tp_size": 1,
    "some_future_field": {"nested": [1, None]},
}


def test_prefill_body_completions() -> None:
    req = {
        "model": "m",
        "prompt": "hi",
        "max_tokens": 50,
        "min_tokens": 5,
        "stream": True,
        "stream_options": {"include_usage": True},
        "temperature": 0,
    }
    orig = copy.deepcopy(req)
    body = prefill_body(COMPLETIONS, req)
    assert body == {
        "model": "m",
        "prompt": "hi",
        "max_tokens": 1,
        "min_tokens": 1,
        "stream": False,
        "temperature": 0,
        "kv_transfer_params": PREFILL_REQUEST_PARAMS,
    }
    assert req == orig  # the decode leg needs the original
    body["kv_transfer_params"]["remote_host"] = "x"
    assert PREFILL_REQUEST_PARAMS["remote_host"] is None  # a copy, not the constant


def test_prefill_body_sets_max_tokens_when_absent() -> None:
    body = prefill_body(COMPLETIONS, {"model": "m", "prompt": "p"})
    assert body["max_tokens"] == 1
    assert "min_tokens" not in body
    assert "max_completion_tokens" not in body


def test_prefill_body_chat() -> None:
    body = prefill_body(
        CHAT,
        {"model": "m", "messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 9},
    )
    assert body["max_tokens"] == 1
    assert body["max_completion_tokens"] == 1
    assert body["stream"] is False
    assert body["messages"] == [{"role": "user", "content": "x"}]


def test_prefill_body_responses() -> None:
    body = prefill_body(RESPONSES, {"model": "m", "input": "x", "max_output_tokens": 100})
    assert body["max_output_tokens"] == 1
    assert "max_tokens" not in body
    assert body["kv_transfer_params"] == PREFILL_REQUEST_PARAMS


def test_prefill_body_anthropic_messages() -> None:
    req = {
        "model": "m",
        "messages": [{"role": "user", "content": "x"}],
        "max_tokens": 64,
        "stream": True,
    }
    body = prefill_body(MESSAGES, req)
    assert body["max_tokens"] == 1 and body["stream"] is False
    assert body["kv_transfer_params"] == PREFILL_REQUEST_PARAMS
    assert PD_PATHS["/v1/messages"] == MESSAGES


def test_decode_body_verbatim() -> None:
    req = {"model": "m", "prompt": "p", "stream": True, "max_tokens": 7}
    body = decode_body(req, VLLM_PARAMS)
    assert body == {**req, "kv_transfer_params": VLLM_PARAMS}
    assert "kv_transfer_params" not in req
    assert orjson.loads(orjson.dumps(body))["kv_transfer_params"] == VLLM_PARAMS


def test_parse_prefill_answer_takes_usage_cached_tokens() -> None:
    raw = orjson.dumps(
        {
            "choices": [{"text": "x"}],
            "usage": {"prompt_tokens": 300, "prompt_tokens_details": {"cached_tokens": 256}},
            "kv_transfer_params": VLLM_PARAMS,
        }
    )
    a = parse_prefill_answer(raw)
    assert a.kv_transfer_params == VLLM_PARAMS
    assert a.cached_tokens == 256


def test_parse_prefill_answer_falls_back_to_remote_prefill_cached_tokens() -> None:
    params = {**VLLM_PARAMS, "remote_prefill_cached_tokens": 128}
    a = parse_prefill_answer(
        orjson.dumps({"usage": {"prompt_tokens": 3}, "kv_transfer_params": params})
    )
    assert a.cached_tokens == 128
    a = parse_prefill_answer(orjson.dumps({"kv_transfer_params": VLLM_PARAMS}))
    assert a.cached_tokens == 0


@pytest.mark.parametrize(
    "raw",
    [
        b"not json",
        b"[1,2]",
        b'{"choices": []}',
        b'{"kv_transfer_params": null}',
        b'{"kv_transfer_params": {}}',
        b'{"kv_transfer_params": "x"}',
    ],
)
def test_parse_prefill_answer_rejects(raw: bytes) -> None:
    with pytest.raises(BadPrefillAnswer):
        parse_prefill_answer(raw)


def test_rewrite_json_answer() -> None:
    raw = orjson.dumps(
        {
            "id": "x",
            "usage": {"prompt_tokens": 300, "prompt_tokens_details": {"cached_tokens": 300}},
        }
    )
    out = orjson.loads(rewrite_json_answer(raw, 17))
    assert out["usage"]["prompt_tokens_details"]["cached_tokens"] == 17
    assert out["usage"]["prompt_tokens"] == 300
    # Responses API naming.
    raw = orjson.dumps({"usage": {"input_tokens_details": {"cached_tokens": 5}}})
    assert (
        orjson.loads(rewrite_json_answer(raw, 0))["usage"]["input_tokens_details"]["cached_tokens"]
        == 0
    )
    # Nothing to rewrite / unparsable: byte-identical.
    for same in (b'{"usage": {"prompt_tokens": 3}}', b"garbage cached_tokens", b'{"usage": null}'):
        assert rewrite_json_answer(same, 1) == same


SSE = (
    b'data: {"id":"c","choices":[{"text":"a"}],"usage":null}\n\n'
    b'data: {"id":"c","choices":[{"text":"b"}],"usage":null}\n\n'
    b'data: {"id":"c","choices":[],"usage":{"prompt_tokens":300,"completion_tokens":2,'
    b'"prompt_tokens_details":{"cached_tokens":300}}}\n\n'
    b"data: [DONE]\n\n"
)


def _expected_sse(cached: int) -> bytes:
    out = []
    for line in SSE.split(b"\n"):
        if b"cached_tokens" in line:
            doc = orjson.loads(line[6:])
            doc["usage"]["prompt_tokens_details"]["cached_tokens"] = cached
            out.append(b"data: " + orjson.dumps(doc))
        else:
            out.append(line)
    return b"\n".join(out)


@pytest.mark.parametrize("chunk", [1, 3, 7, 50, len(SSE)])
def test_sse_rewriter_any_chunking(chunk: int) -> None:
    r = SseRewriter(42)
    out = b"".join(r.feed(SSE[i : i + chunk]) for i in range(0, len(SSE), chunk)) + r.flush()
    assert out == _expected_sse(42)
    last = next(ln for ln in out.split(b"\n") if b"cached_tokens" in ln)
    assert orjson.loads(last[6:])["usage"]["prompt_tokens_details"]["cached_tokens"] == 42


def test_sse_rewriter_emits_complete_lines_immediately() -> None:
    r = SseRewriter(1)
    first = b'data: {"choices":[{"text":"a"}]}\n\n'
    assert r.feed(first) == first  # nothing held back
    assert r.feed(b"data: {") == b""  # partial line waits
    assert r.feed(b'"x":1}\n') == b'data: {"x":1}\n'


def test_sse_rewriter_keeps_crlf_and_unknown_lines() -> None:
    r = SseRewriter(3)
    src = b'event: x\r\ndata: {"usage":{"prompt_tokens_details":{"cached_tokens":9}}}\r\n\r\n'
    out = r.feed(src) + r.flush()
    assert out.startswith(b"event: x\r\n")
    assert out.endswith(b"\r\n\r\n")
    assert b'"cached_tokens":3' in out


def test_sse_rewriter_overlong_line_passes_through_bounded() -> None:
    r = SseRewriter(5, max_line=16)
    big = b"data: " + b"x" * 100
    outs = [r.feed(big[:50]), r.feed(big[50:]), r.feed(b"\ndata: {}\n")]
    assert outs[0] == big[:50]  # over the cap: passed on, not buffered
    assert b"".join(outs) + r.flush() == big + b"\ndata: {}\n"
    assert len(r._pending) == 0


def test_sse_rewriter_responses_api_nested_usage() -> None:
    ev = {
        "type": "response.completed",
        "response": {"usage": {"input_tokens_details": {"cached_tokens": 8}}},
    }
    r = SseRewriter(2)
    out = r.feed(b"data: " + orjson.dumps(ev) + b"\n\n")
    doc = orjson.loads(out.split(b"\n")[0][6:])
    assert doc["response"]["usage"]["input_tokens_details"]["cached_tokens"] == 2
