"""Token usage from response bodies seen in chunks."""

from __future__ import annotations

import orjson

from epp.handlers.usage import MAX_JSON_BYTES, MAX_LINE_BYTES, UsageScanner


def usage(sc: UsageScanner) -> tuple[int | None, int | None, int | None]:
    return sc.prompt_tokens, sc.completion_tokens, sc.cached_tokens


def test_non_streaming_json_usage() -> None:
    body = orjson.dumps(
        {
            "choices": [{"text": "hi"}],
            "usage": {
                "prompt_tokens": 12,
                "completion_tokens": 4,
                "prompt_tokens_details": {"cached_tokens": 8},
            },
        }
    )
    sc = UsageScanner(sse=False)
    sc.feed(body[:10], False)
    assert usage(sc) == (None, None, None)  # parsed only at the end
    sc.feed(body[10:], True)
    assert usage(sc) == (12, 4, 8)


def test_sse_usage_split_across_chunks() -> None:
    stream = (
        b'data: {"choices": [{"text": "a"}]}\n\n'
        b'data: {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 2}}\n\n'
        b"data: [DONE]\n\n"
    )
    sc = UsageScanner(sse=True)
    for i in range(0, len(stream), 7):  # split every 7 bytes: events straddle chunks
        sc.feed(stream[i : i + 7], i + 7 >= len(stream))
    assert (sc.prompt_tokens, sc.completion_tokens) == (5, 2)


def test_responses_api_usage_names() -> None:
    ev = b'data: {"type": "response.completed", "response": {"usage": {"input_tokens": 9, "output_tokens": 1}}}\n'
    sc = UsageScanner(sse=True)
    sc.feed(ev, True)
    assert (sc.prompt_tokens, sc.completion_tokens) == (9, 1)


def test_memory_is_bounded() -> None:
    sc = UsageScanner(sse=False)
    sc.feed(b"x" * (MAX_JSON_BYTES + 1), False)
    sc.feed(b'{"usage": {"prompt_tokens": 1}}', True)
    assert sc.prompt_tokens is None  # too large to parse: given up, nothing held
    assert len(sc._buf) == 0
    sse = UsageScanner(sse=True)
    sse.feed(b"data: " + b"y" * (MAX_LINE_BYTES + 10), False)  # an endless line
    assert len(sse._carry) == 0
    sse.feed(b'\ndata: {"usage": {"prompt_tokens": 3}}\n', True)
    assert sse.prompt_tokens == 3


def test_garbage_is_ignored() -> None:
    sc = UsageScanner(sse=True)
    sc.feed(b'data: {"usage": not json}\n', False)
    sc.feed(b"data: [1, 2]\n", True)
    assert sc.prompt_tokens is None
