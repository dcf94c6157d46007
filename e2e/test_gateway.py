"""End-to-end: real traffic through the gateway URL (kind cluster or the local stack).

What a user relies on, checked from the outside: requests reach a decode endpoint
the EPP chose, prompts with a shared prefix stick to one endpoint, sessions stick,
long prompts are disaggregated and short ones are not, errors come back as JSON
with the right status, client-sent routing headers never steer traffic, the
picker's fallback endpoint is used when the primary dies, and the EPP's failure
mode (fail-closed / fail-open) is honoured.
"""

from __future__ import annotations

import os
import signal
import time
import urllib.error
import urllib.request
import uuid
from typing import Any

import orjson
import pytest
from e2e_target import Target

SERVED_BY = "x-inference-served-by"


def post(
    t: Target,
    body: bytes | dict[str, Any],
    path: str = "/v1/completions",
    headers: dict[str, str] | None = None,
    timeout: float = 30.0,
) -> tuple[int, dict[str, str], bytes]:
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    req = urllib.request.Request(t.base_url + path, data=data, method="POST")
    req.add_header("content-type", "application/json")
    for k, v in (headers or {}).items():
        req.add_header(k, v)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


def completion(t: Target, prompt: str, **kw: Any) -> tuple[int, dict[str, str], bytes]:
    headers = kw.pop("headers", None)
    body = {"model": t.model, "prompt": prompt, "max_tokens": 4, "temperature": 0, **kw}
    return post(t, body, headers=headers)


def words(n: int, seed: str) -> str:
    return " ".join(f"{seed}{i % 97}" for i in range(n))


def decode_servers(t: Target) -> set[str]:
    local = t.local
    assert local is not None
    return {
        c["address"]
        for c in local["components"]
        if c["name"].startswith("sim-decode") and "decode" in c["what"]
    }


def metric(url: str, name: str, **labels: str) -> float:
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


# -- routing -----------------------------------------------------------------


def test_completion_reaches_a_decode_endpoint(target: Target) -> None:
    status, headers, body = completion(target, "Hello there")
    assert status == 200, body
    out = orjson.loads(body)
    assert out["choices"][0]["text"] and out["usage"]["completion_tokens"] == 4
    assert SERVED_BY in headers
    if target.local is not None:
        assert headers[SERVED_BY] in decode_servers(target)


def test_chat_streaming_with_usage(target: Target) -> None:
    body = {
        "model": target.model,
        "messages": [{"role": "user", "content": "stream please"}],
        "max_tokens": 5,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    status, headers, raw = post(target, body, "/v1/chat/completions")
    assert status == 200, raw
    assert headers["content-type"].startswith("text/event-stream")
    events = [line[6:] for line in raw.decode().splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [orjson.loads(e) for e in events[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text.strip()
    assert chunks[-1]["usage"]["completion_tokens"] == 5


def test_shared_prefix_sticks_to_one_endpoint(target: Target) -> None:
    prefix = words(150, "pfx" + uuid.uuid4().hex[:6])
    served = set()
    for i in range(8):
        status, headers, body = completion(target, f"{prefix} question {i}?")
        assert status == 200, body
        served.add(headers[SERVED_BY])
    assert len(served) == 1, f"a shared prefix was spread over {served}"


def test_session_token_keeps_a_session_on_its_endpoint(target: Target) -> None:
    status, headers, _ = completion(target, "start of a session " + uuid.uuid4().hex)
    assert status == 200
    token = headers.get("x-session-token")
    assert token, f"no x-session-token in {headers}"
    first = headers[SERVED_BY]
    for i in range(6):
        prompt = f"turn {i} " + uuid.uuid4().hex  # unrelated prompts: only the token binds
        status, h, _ = completion(target, prompt, headers={"x-session-token": token})
        assert status == 200
        assert h[SERVED_BY] == first


def test_client_routing_headers_never_steer(target: Target) -> None:
    # A client naming an address outside the pool (here: a prefill server, or junk).
    bogus = ["127.0.0.1:1", "10.0.0.1:8000"]
    if target.local is not None:
        bogus += [c["address"] for c in target.local["components"] if "prefill" in c["name"]]
    for dest in bogus:
        status, headers, body = completion(
            target,
            "steer me " + uuid.uuid4().hex,
            headers={
                "x-gateway-destination-endpoint": dest,
                "x-prefiller-host-port": "127.0.0.1:1",
            },
        )
        assert status == 200, body
        assert headers[SERVED_BY] != dest
        if target.local is not None:
            assert headers[SERVED_BY] in decode_servers(target)


# -- prefill/decode disaggregation -------------------------------------------


@pytest.mark.local_stack
def test_long_prompt_is_disaggregated_short_is_not(target: Target) -> None:
    local = target.require_local("reads the EPP's and model servers' /metrics")
    epp = local["epp_metrics"]
    prefill = next(c["address"] for c in local["components"] if c["name"].startswith("sim-prefill"))
    before_pd = metric(epp, "llm_d_epp_disagg_decision_total", decision="prefill-decode")
    before_short = metric(epp, "llm_d_epp_disagg_decision_total", decision="decode-only")
    before_prefill = metric(f"http://{prefill}/metrics", "vllm:prompt_tokens_by_source_total")

    status, headers, body = completion(target, words(800, "long" + uuid.uuid4().hex[:6]))
    assert status == 200, body
    decode = headers[SERVED_BY]
    assert (
        metric(epp, "llm_d_epp_disagg_decision_total", decision="prefill-decode") == before_pd + 1
    )
    # The prefill server computed the prompt; the decode server pulled it as KV.
    assert (
        metric(f"http://{prefill}/metrics", "vllm:prompt_tokens_by_source_total") > before_prefill
    )
    pulled = metric(
        f"http://{decode}/metrics",
        "vllm:prompt_tokens_by_source_total",
        source="external_kv_transfer",
    )
    assert pulled >= 800

    status, _, _ = completion(target, "short prompt " + uuid.uuid4().hex[:6])
    assert status == 200
    assert (
        metric(epp, "llm_d_epp_disagg_decision_total", decision="decode-only") == before_short + 1
    )
    assert (
        metric(epp, "llm_d_epp_disagg_decision_total", decision="prefill-decode") == before_pd + 1
    )


# -- errors ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "status"),
    [
        (b"this is not json", 400),
        (b"[1, 2]", 400),
        (b'{"prompt": "no model"}', 400),
    ],
)
def test_bad_requests_get_json_errors(target: Target, body: bytes, status: int) -> None:
    got, headers, raw = post(target, body)
    assert got == status
    assert headers["content-type"].startswith("application/json")
    err = orjson.loads(raw)["error"]
    assert err["message"]


def _post_raw_reading_early(t: Target, body: bytes) -> tuple[int, bytes]:
    """POST while reading concurrently: the gateway answers 413 before the body is
    through and closes the connection, so a client that only reads after sending
    would see a reset instead of the answer."""
    import socket
    import threading
    from urllib.parse import urlsplit

    u = urlsplit(t.base_url)
    sock = socket.create_connection((u.hostname or "127.0.0.1", u.port or 80), timeout=30)
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: {u.netloc}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()

    def send() -> None:
        try:
            sock.sendall(head)
            view = memoryview(body)
            for i in range(0, len(body), 65536):
                sock.sendall(view[i : i + 65536])
        except OSError:
            pass  # the gateway stopped reading: expected

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    data = b""
    try:
        while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < _content_length(data):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    finally:
        sock.close()
    status = int(data.split(b" ", 2)[1])
    return status, data.split(b"\r\n\r\n", 1)[1]


def _content_length(data: bytes) -> int:
    for line in data.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":", 1)[1])
    return 1 << 40


def test_oversized_body_gets_413_json(target: Target) -> None:
    big = b'{"model": "m", "prompt": "' + b"a" * (17 * 1024 * 1024) + b'"}'
    got, raw = _post_raw_reading_early(target, big)
    assert got == 413
    assert orjson.loads(raw)["error"]["message"]


def test_unknown_model_is_a_vllm_style_404(target: Target) -> None:
    got, _, raw = post(target, {"model": "no-such-model", "prompt": "x", "max_tokens": 1})
    assert got == 404
    assert orjson.loads(raw)["error"]["message"]


# -- failures ----------------------------------------------------------------


def _kill(pid: int) -> None:
    os.killpg(pid, signal.SIGKILL)


@pytest.mark.local_stack
def test_fallback_endpoint_used_when_primary_dies(fresh_local_stack: Target) -> None:
    t = fresh_local_stack
    dead = t.component("sim-decode-0")
    alive = t.component("sim-decode-1")["address"]
    _kill(dead["pid"])
    # Envoy drops its pooled connections to the dead server once it sees them close;
    # requests already written on such a connection are not retried (not idempotent).
    time.sleep(0.5)
    # Right after the kill the EPP still sees decode-0 (its metrics are not yet
    # stale), so some picks name it first: Envoy must walk to the fallback.
    for i in range(12):
        status, headers, body = completion(t, f"after the crash {i} " + uuid.uuid4().hex)
        assert status == 200, body
        assert headers[SERVED_BY] == alive


@pytest.mark.local_stack
def test_epp_down_fail_closed_rejects(fresh_local_stack: Target) -> None:
    t = fresh_local_stack
    assert completion(t, "before")[0] == 200
    _kill(t.component("epp")["pid"])
    time.sleep(0.5)
    status, _, _ = completion(t, "after the EPP died")
    assert status >= 500


@pytest.mark.local_stack
@pytest.mark.parametrize("fresh_local_stack", [("--fail-open",)], indirect=True)
def test_epp_down_fail_open_serves_pool_members_only(fresh_local_stack: Target) -> None:
    t = fresh_local_stack
    members = decode_servers(t)
    _kill(t.component("epp")["pid"])
    # Envoy's active health check marks the EPP down within a few intervals.
    deadline = time.monotonic() + 15
    while True:
        status, headers, _ = completion(t, "fail open " + uuid.uuid4().hex)
        if status == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert status == 200
    assert headers[SERVED_BY] in members
    admin = t.component("envoy")  # a non-member address a client might try to reach
    status, headers, _ = completion(
        t, "steer", headers={"x-gateway-destination-endpoint": admin["address"]}
    )
    assert status == 200
    assert headers[SERVED_BY] in members
