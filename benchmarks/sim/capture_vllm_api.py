"""Record real vLLM-CPU responses for the simulator's shape tests.

Starts one real vLLM (``pdroute.stack.vllm``, environment from
``PDROUTE_FULL=1 scripts/bootstrap``), sends the request set in :data:`CASES`, and
writes status, content type and body (JSON, or the list of SSE ``data:`` payloads) of
each to ``tests/unit/sim/fixtures/vllm-0.32-api.json``. The same cases can be sent to
a simulator (``--target host:port``) to compare by hand.

    .venv/bin/python benchmarks/sim/capture_vllm_api.py            # real vLLM
    .venv/bin/python benchmarks/sim/capture_vllm_api.py --target 127.0.0.1:8000 --out /tmp/sim.json
"""

from __future__ import annotations

import argparse
import socket
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import orjson

OUT = (
    Path(__file__).resolve().parents[2]
    / "tests"
    / "unit"
    / "sim"
    / "fixtures"
    / "vllm-0.32-api.json"
)
MODEL = "tiny"
PROMPT = "The prefill pod computes the KV cache and the decode pod generates tokens."
MSGS = [{"role": "user", "content": "Hello world! How are you today?"}]

#: name -> (method, path, body (dict, raw bytes or None))
CASES: dict[str, tuple[str, str, Any]] = {
    "completion": ("POST", "/v1/completions", {"model": MODEL, "prompt": PROMPT, "max_tokens": 5}),
    "completion_stream_usage": (
        "POST",
        "/v1/completions",
        {"model": MODEL, "prompt": PROMPT, "max_tokens": 3, "stream": True,
         "stream_options": {"include_usage": True}},
    ),
    "completion_stream": (
        "POST", "/v1/completions", {"model": MODEL, "prompt": PROMPT, "max_tokens": 3, "stream": True}
    ),
    "chat": ("POST", "/v1/chat/completions", {"model": MODEL, "messages": MSGS, "max_tokens": 5}),
    "chat_stream_usage": (
        "POST",
        "/v1/chat/completions",
        {"model": MODEL, "messages": MSGS, "max_tokens": 3, "stream": True,
         "stream_options": {"include_usage": True}},
    ),
    "chat_stream": (
        "POST", "/v1/chat/completions", {"model": MODEL, "messages": MSGS, "max_tokens": 3, "stream": True}
    ),
    "err_model": ("POST", "/v1/completions", {"model": "nope", "prompt": "x", "max_tokens": 2}),
    "err_max_tokens": ("POST", "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 100000}),
    "err_prompt_too_long": ("POST", "/v1/completions", {"model": MODEL, "prompt": "hello " * 3000, "max_tokens": 1}),
    "err_bad_json": ("POST", "/v1/completions", b"{not json"),
    "err_prompt_type": ("POST", "/v1/completions", {"model": MODEL, "prompt": 5}),
    "err_chat_empty": ("POST", "/v1/chat/completions", {"model": MODEL, "messages": []}),
    "models": ("GET", "/v1/models", None),
    "tokenize": ("POST", "/tokenize", {"model": MODEL, "prompt": PROMPT}),
    "tokenize_chat": ("POST", "/tokenize", {"model": MODEL, "messages": MSGS}),
    "health": ("GET", "/health", None),
    "version": ("GET", "/version", None),
    "not_found": ("GET", "/nope", None),
}  # fmt: skip


def call(base: str, method: str, path: str, body: Any) -> dict[str, Any]:
    data = body if isinstance(body, bytes) else (orjson.dumps(body) if body is not None else None)
    req = urllib.request.Request(base + path, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            status, ctype, raw = r.status, r.headers.get("content-type", ""), r.read()
    except urllib.error.HTTPError as e:
        status, ctype, raw = e.code, e.headers.get("content-type", ""), e.read()
    out: dict[str, Any] = {"status": status, "content_type": ctype}
    if ctype.startswith("text/event-stream"):
        events = []
        for block in raw.decode().split("\n\n"):
            if block.startswith("data: "):
                payload = block[6:]
                events.append(payload if payload == "[DONE]" else orjson.loads(payload))
        out["sse"] = events
    elif ctype.startswith("application/json"):
        out["json"] = orjson.loads(raw)
    else:
        out["text"] = raw.decode(errors="replace")
    return out


def capture(base: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, (method, path, body) in CASES.items():
        res = call(base, method, path, body)
        raw = body.decode() if isinstance(body, bytes) else None
        res["request"] = {"method": method, "path": path, "body": None if raw else body, "raw": raw}
        out[name] = res
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--target", default="", help="host:port of a running server (skip starting vLLM)"
    )
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    if args.target:
        result = capture(f"http://{args.target}")
    else:
        from pdroute.stack.vllm import VllmServer, VllmSpec, find_vllm_install

        install = find_vllm_install()
        spec = VllmSpec(port=_free_port(), served_model_name=MODEL, max_model_len=2048)
        with tempfile.TemporaryDirectory(prefix="vllm-capture-") as d:
            server = VllmServer(install, spec, Path(d))
            server.start()
            try:
                server.wait_ready(timeout_s=900)
                result = capture(server.url)
            finally:
                server.stop()
        result["_provenance"] = {
            "server": "vllm-cpu 0.32.0",
            "model": "tiny-llama (random weights)",
        }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_bytes(
        orjson.dumps(result, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS)
    )
    print(f"wrote {args.out} ({len(result)} cases)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
