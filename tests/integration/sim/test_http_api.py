"""The simulator's HTTP surface looks like vLLM 0.32's OpenAI server."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest

from pdroute.protocol.blockhash import chain_block_hashes
from pdroute.protocol.headers import SERVED_BY
from pdroute.sim.config import LoraModule, SimConfig
from pdroute.sim.fleet import SimFleet
from pdroute.sim.latency import get_profile
from pdroute.sim.tokenizer import Tokenizer

MODEL = "sim-llama"


@pytest.fixture
async def fleet() -> AsyncIterator[SimFleet]:
    cfg = SimConfig(
        model=MODEL,
        profile=get_profile("fast"),
        block_size=16,
        num_blocks=512,
        max_model_len=1024,
        lora_modules=(LoraModule("ad1", "/loras/ad1"),),
        max_loras=1,
    )
    async with SimFleet(cfg, replicas=2) as f:
        yield f


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


def url(f: SimFleet, path: str, i: int = 0) -> str:
    return f"http://{f.addresses[i]}{path}"


async def sse_events(resp: aiohttp.ClientResponse) -> list[Any]:
    out: list[Any] = []
    text = await resp.text()
    assert text.endswith("data: [DONE]\n\n")
    for block in text.split("\n\n"):
        if block:
            assert block.startswith("data: ")
            data = block[6:]
            out.append(data if data == "[DONE]" else orjson.loads(data))
    return out


async def test_completion_shape_usage_and_served_by(
    fleet: SimFleet, http: aiohttp.ClientSession
) -> None:
    prompt = "the prefix cache " * 20
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 4}
    async with http.post(url(fleet, "/v1/completions", 1), json=body) as r:
        assert r.status == 200
        assert r.headers[SERVED_BY] == fleet.addresses[1]
        j = await r.json()
    assert j["object"] == "text_completion" and j["id"].startswith("cmpl-")
    assert j["model"] == MODEL
    [choice] = j["choices"]
    assert choice["finish_reason"] == "length" and len(choice["text"].split()) == 2
    n_prompt = len(Tokenizer().encode(prompt))
    assert j["usage"] == {
        "prompt_tokens": n_prompt,
        "total_tokens": n_prompt + 4,
        "completion_tokens": 4,
        "prompt_tokens_details": {
            "cached_tokens": 0,
            "created_cache_tokens": None,
            "multimodal_tokens": None,
        },
        "completion_tokens_details": None,
    }
    assert j["kv_transfer_params"] is None
    # Same prompt again: full blocks except the last token are prefix-cache hits.
    async with http.post(url(fleet, "/v1/completions", 1), json=body) as r:
        j2 = await r.json()
    assert j2["usage"]["prompt_tokens_details"]["cached_tokens"] == (n_prompt - 1) // 16 * 16
    assert j2["choices"][0]["text"] == choice["text"]  # deterministic output


async def test_completion_default_max_tokens_is_16(
    fleet: SimFleet, http: aiohttp.ClientSession
) -> None:
    async with http.post(url(fleet, "/v1/completions"), json={"prompt": "hi"}) as r:
        j = await r.json()
    assert j["usage"]["completion_tokens"] == 16 and j["choices"][0]["finish_reason"] == "length"


async def test_chat_non_streaming_stops_on_its_own(
    fleet: SimFleet, http: aiohttp.ClientSession
) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hello"}]}
    async with http.post(url(fleet, "/v1/chat/completions"), json=body) as r:
        assert r.status == 200
        j = await r.json()
    assert j["object"] == "chat.completion" and j["id"].startswith("chatcmpl-")
    msg = j["choices"][0]["message"]
    assert msg["role"] == "assistant" and msg["content"]
    assert j["choices"][0]["finish_reason"] == "stop"
    assert 8 <= j["usage"]["completion_tokens"] < 64


async def test_chat_streaming_with_include_usage(
    fleet: SimFleet, http: aiohttp.ClientSession
) -> None:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "stream please"}],
        "max_tokens": 5,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    async with http.post(url(fleet, "/v1/chat/completions"), json=body) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/event-stream")
        assert r.headers[SERVED_BY] == fleet.addresses[0]
        events = await sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    content = chunks[1:-1]
    assert len(content) == 5
    assert all(c["object"] == "chat.completion.chunk" for c in content)
    assert [c["choices"][0]["finish_reason"] for c in content] == [None] * 4 + ["length"]
    assert len({c["id"] for c in chunks}) == 1
    usage = chunks[-1]
    assert usage["choices"] == []
    assert usage["usage"]["completion_tokens"] == 5
    assert "cached_tokens" in usage["usage"]["prompt_tokens_details"]


async def test_completion_streaming_without_usage(
    fleet: SimFleet, http: aiohttp.ClientSession
) -> None:
    body = {"prompt": "abc", "max_tokens": 3, "stream": True}
    async with http.post(url(fleet, "/v1/completions"), json=body) as r:
        events = await sse_events(r)
    chunks = events[:-1]
    assert len(chunks) == 3
    assert all(c["object"] == "text_completion" and "usage" not in c for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize(
    "case",
    [
        ("/v1/completions", {"model": "nope", "prompt": "x"}, 404, "NotFoundError", "model"),
        ("/v1/completions", {"prompt": 5}, 400, "Bad Request", "body.prompt"),
        ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "BadRequestError", "max_tokens"),
        (
            "/v1/completions",
            {"prompt": "x", "max_tokens": 5000},
            400,
            "BadRequestError",
            "max_tokens",
        ),
        ("/v1/completions", {"prompt": "x " * 2000}, 400, "BadRequestError", "input_tokens"),
        ("/v1/chat/completions", {"messages": []}, 400, "BadRequestError", None),
        (
            "/v1/chat/completions",
            {"messages": [{"content": "x"}]},
            400,
            "BadRequestError",
            "messages",
        ),
    ],
)
async def test_errors_have_vllm_shape(
    fleet: SimFleet,
    http: aiohttp.ClientSession,
    case: tuple[str, dict[str, Any], int, str, str | None],
) -> None:
    path, body, status, etype, param = case
    async with http.post(url(fleet, path), json=body) as r:
        assert r.status == status
        assert r.headers[SERVED_BY] == fleet.addresses[0]
        j = await r.json()
    assert set(j) == {"error"}
    assert set(j["error"]) == {"message", "type", "param", "code"}
    assert j["error"]["type"] == etype and j["error"]["code"] == status
    assert j["error"]["param"] == param
    assert j["error"]["message"]


async def test_context_length_message(fleet: SimFleet, http: aiohttp.ClientSession) -> None:
    async with http.post(url(fleet, "/v1/completions"), json={"prompt": "x " * 2000}) as r:
        j = await r.json()
    assert "maximum context length is 1024 tokens" in j["error"]["message"]


async def test_invalid_json_is_400(fleet: SimFleet, http: aiohttp.ClientSession) -> None:
    async with http.post(url(fleet, "/v1/completions"), data=b"{not json") as r:
        assert r.status == 400
        assert (await r.json())["error"]["type"] == "Bad Request"
    async with http.get(url(fleet, "/nope")) as r:
        assert r.status == 404


async def test_models_health_version_tokenize(fleet: SimFleet, http: aiohttp.ClientSession) -> None:
    async with http.get(url(fleet, "/v1/models")) as r:
        j = await r.json()
    assert j["object"] == "list"
    assert [(m["id"], m["parent"]) for m in j["data"]] == [(MODEL, None), ("ad1", MODEL)]
    assert j["data"][0]["max_model_len"] == 1024 and j["data"][1]["root"] == "/loras/ad1"
    async with http.get(url(fleet, "/health")) as r:
        assert r.status == 200
    async with http.get(url(fleet, "/version")) as r:
        assert "version" in await r.json()
    async with http.post(url(fleet, "/tokenize"), json={"model": MODEL, "prompt": "a b"}) as r:
        j = await r.json()
    assert j == {
        "count": 4,
        "max_model_len": 1024,
        "tokens": Tokenizer().encode("a b"),
        "token_strs": None,
    }
    async with http.post(
        url(fleet, "/tokenize"), json={"messages": [{"role": "user", "content": "a"}]}
    ) as r:
        assert (await r.json())["count"] > 3
    async with http.post(
        url(fleet, "/detokenize"), json={"tokens": [Tokenizer().output_token(1, 0)]}
    ) as r:
        assert (await r.json())["prompt"].strip()


async def test_lora_adapter_routes_and_changes_hashes(
    fleet: SimFleet, http: aiohttp.ClientSession
) -> None:
    body = {"model": "ad1", "prompt": "adapter " * 40, "max_tokens": 2}
    async with http.post(url(fleet, "/v1/completions"), json=body) as r:
        assert r.status == 200
        assert (await r.json())["model"] == "ad1"
    srv = fleet.servers[0]
    ids = Tokenizer().encode(body["prompt"])  # type: ignore[arg-type]
    base = chain_block_hashes(ids, 16)
    lora = chain_block_hashes(ids, 16, extra_keys=("ad1",))
    assert srv.pool.lookup(lora) and not srv.pool.lookup(base)
    async with http.get(url(fleet, "/metrics")) as r:
        text = await r.text()
    assert 'vllm:lora_requests_info{engine="0",max_lora="1"' in text


async def test_metrics_endpoint_counts(fleet: SimFleet, http: aiohttp.ClientSession) -> None:
    async with http.post(url(fleet, "/v1/completions"), json={"prompt": "m", "max_tokens": 3}) as r:
        assert r.status == 200
    async with http.get(url(fleet, "/metrics")) as r:
        assert r.headers["Content-Type"].startswith("text/plain")
        text = await r.text()
    assert f'vllm:generation_tokens_total{{engine="0",model_name="{MODEL}"}} 3.0' in text
    assert (
        f'vllm:request_success_total{{engine="0",finished_reason="length",model_name="{MODEL}"}} 1.0'
        in text
    )
    assert 'prefix_caching_hash_algo="sha256"' in text
    assert 'num_gpu_blocks="512"' in text


async def test_metrics_name_filter(fleet: SimFleet, http: aiohttp.ClientSession) -> None:
    """As vLLM: ``/metrics/?name[]=...`` serves only those samples, ``/metrics``
    ignores the filter."""
    q = "name[]=vllm:num_requests_running&name%5B%5D=vllm%3Akv_cache_usage_perc"
    async with http.get(url(fleet, "/metrics/?" + q)) as r:
        assert r.status == 200
        text = await r.text()
    samples = [ln for ln in text.splitlines() if not ln.startswith("#")]
    assert [s.split("{")[0] for s in samples] == [
        "vllm:num_requests_running",
        "vllm:kv_cache_usage_perc",
    ]
    assert f'vllm:num_requests_running{{engine="0",model_name="{MODEL}"}} 0.0' in samples
    async with http.get(url(fleet, "/metrics?" + q)) as r:
        assert "vllm:generation_tokens_total" in await r.text()  # vLLM's quirk: everything


async def test_failure_injection() -> None:
    cfg = SimConfig(
        model=MODEL, profile=get_profile("instant"), failure_rate=1.0, failure_types=("rate_limit",)
    )
    async with (
        SimFleet(cfg) as f,
        aiohttp.ClientSession() as s,
        s.post(url(f, "/v1/completions"), json={"prompt": "x"}) as r,
    ):
        assert r.status == 429
        assert (await r.json())["error"]["type"] == "RateLimitError"


async def test_queue_full_is_503() -> None:
    cfg = SimConfig(model=MODEL, profile=get_profile("fast"), max_num_seqs=1, max_waiting=1)
    async with SimFleet(cfg) as f, aiohttp.ClientSession() as s:
        import asyncio

        async def one() -> int:
            async with s.post(
                url(f, "/v1/completions"), json={"prompt": "x", "max_tokens": 50}
            ) as r:
                return r.status

        statuses = await asyncio.gather(*(one() for _ in range(6)))
    assert 503 in statuses and 200 in statuses


async def test_responses_api_non_streaming(fleet: SimFleet, http: aiohttp.ClientSession) -> None:
    body = {"model": MODEL, "input": "hello there", "max_output_tokens": 3}
    async with http.post(url(fleet, "/v1/responses"), json=body) as r:
        assert r.status == 200
        j = await r.json()
    assert j["object"] == "response" and j["id"].startswith("resp-")
    assert j["usage"]["output_tokens"] == 3
    assert j["output"][0]["content"][0]["type"] == "output_text"


async def test_sha256_cbor_and_seed_change_published_hashes() -> None:
    from pdroute.protocol.blockhash import sha256_cbor
    from pdroute.protocol.kv_events import BlockStored

    cfg = SimConfig(
        model=MODEL,
        profile=get_profile("instant"),
        block_size=16,
        hash_algo="sha256_cbor",
        hash_seed="42",
    )
    async with SimFleet(cfg) as f, aiohttp.ClientSession() as s:
        events: list[Any] = []
        f.servers[0].engine.on_events = events.extend
        prompt = "cbor hashes are language independent " * 6
        async with s.post(url(f, "/v1/completions"), json={"prompt": prompt, "max_tokens": 1}) as r:
            assert r.status == 200
    [ev] = [e for e in events if isinstance(e, BlockStored)]
    ids = Tokenizer().encode(prompt)
    from pdroute.protocol.blockhash import to_event_hash

    expected = chain_block_hashes(ids, 16, sha256_cbor, seed="42")
    assert ev.block_hashes == [to_event_hash(h) for h in expected]
    assert ev.block_hashes != [to_event_hash(h) for h in chain_block_hashes(ids, 16)]


@pytest.mark.parametrize("stream", [False, True])
async def test_client_disconnect_aborts_the_request(stream: bool) -> None:
    import asyncio

    cfg = SimConfig(model=MODEL, profile=get_profile("fast"), max_model_len=100_000)
    async with SimFleet(cfg) as f:
        srv = f.servers[0]
        body = {"prompt": "long", "max_tokens": 50_000, "stream": stream}
        async with aiohttp.ClientSession() as s:
            task = asyncio.ensure_future(s.post(url(f, "/v1/completions"), json=body))
            for _ in range(200):
                await asyncio.sleep(0.01)
                if srv.engine.running:
                    break
            assert srv.engine.running
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for _ in range(200):
            if not srv.engine.running:
                break
            await asyncio.sleep(0.01)
        assert not srv.engine.running
        assert srv.stats.success["abort"] == 1
        assert srv.pool.usage() == 0.0


async def test_internal_bug_answers_500_json_and_server_survives(
    fleet: SimFleet, http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    srv = fleet.servers[0]

    def boom(*_a: object, **_k: object) -> str:
        raise RuntimeError("bug")

    monkeypatch.setattr(srv.tok, "token_str", boom)
    async with http.post(url(fleet, "/v1/completions"), json={"prompt": "x", "max_tokens": 2}) as r:
        assert r.status == 500
        assert (await r.json())["error"]["type"] == "InternalServerError"
    body = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 2, "stream": True}
    async with http.post(url(fleet, "/v1/chat/completions"), json=body) as r:
        assert r.status == 200  # headers were out before the failure
        text = await r.text()
    assert '"InternalServerError"' in text and text.endswith("data: [DONE]\n\n")
    monkeypatch.undo()
    async with http.post(url(fleet, "/v1/completions"), json={"prompt": "x", "max_tokens": 2}) as r:
        assert r.status == 200


async def test_runtime_lora_load_and_unload(fleet: SimFleet, http: aiohttp.ClientSession) -> None:
    body = {"model": "ad2", "prompt": "x", "max_tokens": 1}
    async with http.post(url(fleet, "/v1/completions"), json=body) as r:
        assert r.status == 404
    load = {"lora_name": "ad2", "lora_path": "/loras/ad2"}
    async with http.post(url(fleet, "/v1/load_lora_adapter"), json=load) as r:
        assert r.status == 200 and "ad2" in await r.text()
    async with http.post(url(fleet, "/v1/load_lora_adapter"), json=load) as r:
        assert r.status == 400
        assert "already been loaded" in (await r.json())["error"]["message"]
    async with http.post(url(fleet, "/v1/completions"), json=body) as r:
        assert r.status == 200
    async with http.get(url(fleet, "/v1/models")) as r:
        assert "ad2" in [m["id"] for m in (await r.json())["data"]]
    async with http.post(url(fleet, "/v1/unload_lora_adapter"), json={"lora_name": "ad2"}) as r:
        assert r.status == 200
    async with http.post(url(fleet, "/v1/unload_lora_adapter"), json={"lora_name": "ad2"}) as r:
        assert r.status == 404 and (await r.json())["error"]["type"] == "NotFoundError"
    async with http.post(url(fleet, "/v1/completions"), json=body) as r:
        assert r.status == 404


async def test_runtime_lora_needs_enable_lora() -> None:
    async with (
        SimFleet(SimConfig(model=MODEL, profile=get_profile("instant"))) as f,
        aiohttp.ClientSession() as s,
    ):
        async with s.post(
            url(f, "/v1/load_lora_adapter"), json={"lora_name": "a", "lora_path": "/a"}
        ) as r:
            assert r.status == 400
        async with s.get(url(f, "/metrics")) as r:
            assert "lora_requests_info" not in await r.text()
    cfg = SimConfig(model=MODEL, profile=get_profile("instant"), enable_lora=True, max_loras=2)
    async with SimFleet(cfg) as f, aiohttp.ClientSession() as s:
        async with s.post(
            url(f, "/v1/load_lora_adapter"), json={"lora_name": "a", "lora_path": "/a"}
        ) as r:
            assert r.status == 200
        async with s.get(url(f, "/metrics")) as r:
            assert 'max_lora="2"' in await r.text()


async def test_next_chat_turn_hits_blocks_cached_while_generating(
    fleet: SimFleet, http: aiohttp.ClientSession
) -> None:
    msgs: list[dict[str, str]] = [{"role": "user", "content": "tell me a long story " * 5}]
    async with http.post(
        url(fleet, "/v1/chat/completions"), json={"messages": msgs, "max_tokens": 40}
    ) as r:
        j = await r.json()
    first_prompt = j["usage"]["prompt_tokens"]
    msgs += [
        {"role": "assistant", "content": j["choices"][0]["message"]["content"]},
        {"role": "user", "content": "and then?"},
    ]
    async with http.post(
        url(fleet, "/v1/chat/completions"), json={"messages": msgs, "max_tokens": 2}
    ) as r:
        j2 = await r.json()
    # Everything computed in turn 1 (prompt + all but the last generated token) is cached.
    assert j2["usage"]["prompt_tokens_details"]["cached_tokens"] == (first_prompt + 39) // 16 * 16
