"""precise-prefix-cache-producer in the scheduling pipeline (llm-d config shape),
plus the request-side tokenizers (real HTTP /tokenize server, real tokenizer.json)."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path
from types import MappingProxyType
from typing import Any

import msgspec
import pytest
from aiohttp import web

import epp.scheduling.plugins.precise_prefix_cache  # noqa: F401  (registers the types)
from epp.config import ConfigError, load_config_text
from epp.datalayer.tokenizer import (
    EngineKeyer,
    EstimateTokenizer,
    LocalTokenizer,
    TokenizeError,
    VllmTokenizeClient,
)
from epp.datastore import Datastore, Endpoint, EndpointMetrics
from epp.scheduling import CycleState, LLMRequest, Pipeline, build_pipeline
from epp.scheduling.plugins.precise_prefix_cache import (
    PrecisePrefixCacheProducer,
    parse_duration,
)
from pdroute.protocol.kv_events import BlockStored, EventBatch, encode_payload

HEAD = "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\n"
NOW = 100.0

# llm-d's precise guide configuration (router v0.7+), verbatim keys.
LLMD_CONFIG = (
    HEAD
    + """
plugins:
- type: precise-prefix-cache-producer
  parameters:
    speculativeIndexing: true
    speculativeTTL: 2s
    indexerConfig:
      kvBlockIndexConfig:
        enableMetrics: true
        inMemoryConfig: {size: 100000000, podCacheSize: 10}
    tokenProcessorConfig:
      blockSize: 16
      hashSeed: ""
    kvEventsConfig:
      topicFilter: "kv@"
      concurrency: 4
      discoverPods: false
      podDiscoveryConfig: {socketPort: 5557}
- type: prefix-cache-scorer
  parameters:
    prefixMatchInfoProducerName: precise-prefix-cache-producer
- type: queue-scorer
schedulingProfiles:
- name: default
  plugins:
  - {pluginRef: prefix-cache-scorer, weight: 3}
  - {pluginRef: queue-scorer, weight: 1}
"""
)


def make_store(n: int, waiting: list[int] | None = None) -> Datastore:
    ds = Datastore(clock=lambda: NOW)
    eps = [Endpoint(f"pod{i}", f"10.0.0.{i}", 8000, labels=MappingProxyType({})) for i in range(n)]
    ds.replace_endpoints(eps)
    for i, e in enumerate(eps):
        ds.update_metrics(
            e.key,
            EndpointMetrics(
                waiting=(waiting or [0] * n)[i], block_size=16, num_blocks=2000, updated_at=NOW
            ),
        )
    return ds


def stored_payload(keys: list[int]) -> bytes:
    ev = BlockStored(
        block_hashes=[*keys], parent_block_hash=None, token_ids=[0] * 16 * len(keys), block_size=16
    )
    return encode_payload(EventBatch(ts=1.0, events=[ev], data_parallel_rank=0))


async def route(
    pipe: Pipeline, ds: Datastore, tokens: list[int], rid: str = "r"
) -> tuple[str, CycleState]:
    req = LLMRequest(rid, "m", prompt="x", body={"model": "m", "prompt": tokens})
    cands = list(ds.snapshot().endpoints)
    cycle = CycleState()
    for h in pipe.prepare_data:
        await h.prepare_data(cycle, req, cands)
    result, cycle = pipe.scheduler.schedule(req, cands, cycle)
    headers: dict[str, str] = {}
    for hook in pipe.pre_request:
        hook.pre_request(cycle, req, result, headers)
    return result.primary.targets[0].key, cycle


def producer(pipe: Pipeline) -> PrecisePrefixCacheProducer:
    p = pipe.plugin("precise-prefix-cache-producer")
    assert isinstance(p, PrecisePrefixCacheProducer)
    return p


async def test_llmd_config_routes_to_the_endpoint_holding_the_prefix() -> None:
    ds = make_store(3, waiting=[0, 2, 0])
    pipe = build_pipeline(load_config_text(LLMD_CONFIG), datastore=ds, rng=random.Random(0))
    prod = producer(pipe)
    try:
        assert prod.speculative and prod.block_size == 16 and prod.hash_seed is None
        tokens = list(range(1000, 1000 + 16 * 20))
        keys = EngineKeyer(16).keys(tokens)
        # The busier endpoint 1 published the blocks: the prefix outweighs its queue.
        prod.ingestor.on_message("10.0.0.1:8000", 0, stored_payload(keys))
        chosen, cycle = await route(pipe, ds, tokens)
        assert chosen == "10.0.0.1:8000"
        info = prod.match_info(cycle)
        assert info is not None and info.total_blocks == 20
        assert info.matches == {"10.0.0.1:8000": 20}
        assert cycle.prefix_match is info
        # A new prompt nobody holds goes to an idle endpoint; speculation then
        # pins its burst there before any event arrives.
        cold = list(range(5000, 5000 + 16 * 8))
        first, _ = await route(pipe, ds, cold, rid="a")
        assert first in {"10.0.0.0:8000", "10.0.0.2:8000"}
        for i in range(5):
            again, c2 = await route(pipe, ds, cold + [i] * 16, rid=f"b{i}")
            assert again == first
            info2 = prod.match_info(c2)
            assert info2 is not None and info2.matches[first] == 8
        # Capacity follows num_gpu_blocks (x1.25) once reconciled.
        prod.reconcile()
        assert prod.index.capacity("10.0.0.1:8000") == 2500
        # An endpoint leaving the pool is purged.
        ds.replace_endpoints([e for e in ds.endpoints() if e.key != "10.0.0.1:8000"])
        assert prod.index.match(keys) == {}
    finally:
        await prod.stop()


async def test_block_size_and_algo_from_metrics() -> None:
    ds = make_store(2)
    ds.update_metrics(
        "10.0.0.0:8000",
        EndpointMetrics(block_size=32, hash_algo="sha256_cbor", num_blocks=100, updated_at=NOW),
    )
    cfg = LLMD_CONFIG.replace(
        'blockSize: 16\n      hashSeed: ""',
        'blockSizeFromMetrics: true\n      hashAlgo: auto\n      hashSeed: "7"',
    )
    pipe = build_pipeline(load_config_text(cfg), datastore=ds, rng=random.Random(0))
    prod = producer(pipe)
    try:
        keyer = prod.keyer_for(list(ds.snapshot().endpoints))
        assert isinstance(keyer, EngineKeyer)
        assert (keyer.block_size, keyer.hash_algo, keyer.seed) == (32, "sha256_cbor", "7")
        tokens = list(range(64))
        prod.ingestor.on_message("10.0.0.0:8000", 0, stored_payload(keyer.keys(tokens)))
        chosen, cycle = await route(pipe, ds, tokens)
        assert chosen == "10.0.0.0:8000"
        info = prod.match_info(cycle)
        assert info is not None and info.block_tokens == 32 and info.total_blocks == 2
    finally:
        await prod.stop()


async def test_rekey_mode_matches_whatever_the_engine_hash() -> None:
    ds = make_store(2)
    cfg = LLMD_CONFIG.replace('hashSeed: ""', 'hashSeed: ""\n      rekeyFromEventTokens: true')
    pipe = build_pipeline(load_config_text(cfg), datastore=ds, rng=random.Random(0))
    prod = producer(pipe)
    try:
        tokens = list(range(16 * 4))
        ev = BlockStored(
            block_hashes=[11, 12, 13, 14],  # arbitrary engine hashes
            parent_block_hash=None,
            token_ids=tokens,
            block_size=16,
        )
        payload = encode_payload(EventBatch(ts=1.0, events=[ev]))
        prod.ingestor.on_message("10.0.0.1:8000", 0, payload)
        chosen, cycle = await route(pipe, ds, tokens)
        assert chosen == "10.0.0.1:8000"
        info = prod.match_info(cycle)
        assert info is not None and info.matches == {"10.0.0.1:8000": 4}
    finally:
        await prod.stop()


async def test_standalone_precise_scorer_type() -> None:
    ds = make_store(2)
    cfg = (
        HEAD
        + "plugins:\n- type: precise-prefix-cache-scorer\n  parameters:\n"
        + "    kvEventsConfig: {discoverPods: false}\n"
        + "schedulingProfiles:\n- name: d\n  plugins: [{pluginRef: precise-prefix-cache-scorer}]\n"
    )
    pipe = build_pipeline(load_config_text(cfg), datastore=ds, rng=random.Random(0))
    prod = pipe.plugin("precise-prefix-cache-scorer-producer")
    assert isinstance(prod, PrecisePrefixCacheProducer)
    try:
        tokens = list(range(48))
        prod.ingestor.on_message("10.0.0.1:8000", 0, stored_payload(EngineKeyer(16).keys(tokens)))
        for i in range(5):
            chosen, _ = await route(pipe, ds, tokens, rid=str(i))
            assert chosen == "10.0.0.1:8000"
    finally:
        await prod.stop()


@pytest.mark.parametrize(
    ("snippet", "key"),
    [
        ("speculativeTTL: soon", "speculativeTTL"),
        ("tokenProcessorConfig: {blockSizeTokens: -1}", "tokenProcessorConfig.blockSizeTokens"),
        ("kvEventsConfig: {engineType: sglang}", "kvEventsConfig.engineType"),
        ("indexerConfig: {tokenizersPoolConfig: {}}", "indexerConfig.tokenizersPoolConfig"),
        ("kvEventsConfig: {zmqEndpoint: 5}", "kvEventsConfig.zmqEndpoint"),
        ("tokenizer: {source: local}", "tokenizer.modelDir"),
        ("bogus: 1", "bogus"),
    ],
)
def test_bad_parameters_name_the_key(snippet: str, key: str) -> None:
    cfg = (
        HEAD
        + f"plugins:\n- type: precise-prefix-cache-producer\n  parameters: {{{snippet}}}\n"
        + "- type: prefix-cache-scorer\n"
    )
    with pytest.raises(ConfigError) as ei:
        build_pipeline(load_config_text(cfg, source="cfg.yaml"), datastore=make_store(1))
    assert key in str(ei.value) and "cfg.yaml" in str(ei.value)


def test_parse_duration() -> None:
    assert parse_duration("2s") == 2.0
    assert parse_duration("500ms") == 0.5
    assert parse_duration("1m") == 60.0
    assert parse_duration("1.5") == 1.5
    with pytest.raises(ValueError):
        parse_duration("2h")


# --------------------------------------------------------------------------- tokenizers


class FakeVllmTokenize:
    """A real HTTP server with vLLM's /tokenize shape."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self.mode = "ok"
        # A prompt "slow" is held until the test releases it, so cancellation
        # tests do not race a timer on a loaded machine.
        self.release_slow = asyncio.Event()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = msgspec.json.decode(await request.read())
        self.calls.append(body)
        if self.mode == "error":
            return web.Response(status=500, text="boom")
        if self.mode == "garbage":
            return web.Response(text="{not json")
        if self.mode == "huge":
            return web.Response(body=b"[" + b"1," * 5000 + b"1]")
        await asyncio.sleep(0.05)
        if body.get("prompt") == "slow":
            await self.release_slow.wait()
        if "messages" in body:
            text = "|".join(m["content"] for m in body["messages"])
        else:
            text = body["prompt"]
        tokens = [ord(c) for c in text]
        return web.json_response({"tokens": tokens, "count": len(tokens), "max_model_len": 2048})


async def test_vllm_tokenize_client_caches_and_dedups() -> None:
    fake = FakeVllmTokenize()
    app = web.Application()
    app.router.add_post("/tokenize", fake.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    client = VllmTokenizeClient(f"http://127.0.0.1:{port}", max_answer_bytes=4096)
    try:
        res = await asyncio.gather(*(client.tokenize("m", prompt="abc") for _ in range(5)))
        assert all(r.token_ids == [97, 98, 99] and r.count == 3 for r in res)
        assert len(fake.calls) == 1  # concurrent identical prompts share one call
        assert (await client.tokenize("m", prompt="abc")).token_ids == [97, 98, 99]
        assert len(fake.calls) == 1  # cached
        msgs = [{"role": "user", "content": "hi"}]
        assert (await client.tokenize("m", messages=msgs)).token_ids == [104, 105]
        assert fake.calls[-1] == {"model": "m", "messages": msgs}
        for mode, what in (("error", "HTTP 500"), ("garbage", "bad answer"), ("huge", "too large")):
            fake.mode = mode
            with pytest.raises(TokenizeError, match=what):
                await client.tokenize("m", prompt=mode)
        with pytest.raises(TokenizeError):
            await client.tokenize("m")
        # Cancelling the caller (e.g. the director's prepare timeout) propagates as
        # cancellation; a request sharing that call gets an error, not a hang.
        fake.mode = "ok"
        first = asyncio.ensure_future(client.tokenize("m", prompt="slow"))
        await asyncio.sleep(0.01)
        second = asyncio.ensure_future(client.tokenize("m", prompt="slow"))
        await asyncio.sleep(0.01)
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        with pytest.raises(TokenizeError, match="cancelled"):
            await second
        fake.release_slow.set()
        assert (await client.tokenize("m", prompt="slow")).count == 4
    finally:
        await client.close()
        await runner.cleanup()


async def test_producer_tokenizes_chat_via_engine_endpoint() -> None:
    fake = FakeVllmTokenize()
    app = web.Application()
    app.router.add_post("/tokenize", fake.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    ds = Datastore(clock=lambda: NOW)
    ds.replace_endpoints([Endpoint("p", "127.0.0.1", port)])
    ds.update_metrics(f"127.0.0.1:{port}", EndpointMetrics(updated_at=NOW))
    cfg = LLMD_CONFIG.replace("blockSize: 16", "blockSize: 4")
    pipe = build_pipeline(load_config_text(cfg), datastore=ds, rng=random.Random(0))
    prod = producer(pipe)
    try:
        msgs = [{"role": "user", "content": "hello world"}]
        req = LLMRequest("r", "m", prompt="...", body={"model": "m", "messages": msgs})
        cycle = CycleState()
        await prod.prepare_data(cycle, req, list(ds.snapshot().endpoints))
        assert req.token_ids == [ord(c) for c in "hello world"] and req.prompt_tokens == 11
        prod.produce(cycle, req, list(ds.snapshot().endpoints))
        info = prod.match_info(cycle)
        assert info is not None and info.total_blocks == 2 and info.matches == {}
        assert fake.calls == [{"model": "m", "messages": msgs}]
    finally:
        await prod.stop()
        await runner.cleanup()


def _train_tokenizer(path: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["[UNK]"])
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 50, trainer)
    out = path / "tokenizer.json"
    tok.save(str(out))
    return path


async def test_local_tokenizer_and_estimate(tmp_path: Path) -> None:
    model_dir = _train_tokenizer(tmp_path)
    tok = LocalTokenizer(model_dir, thread_threshold_chars=100)
    short = await tok.tokenize("m", prompt="the quick brown fox")
    assert short.exact and short.count == len(short.token_ids or []) > 0
    long_text = "the lazy dog " * 50  # encoded in a worker thread
    long = await tok.tokenize("m", prompt=long_text)
    assert long.token_ids == tok.encode(long_text)
    chat = await tok.tokenize("m", messages=[{"role": "user", "content": "the dog"}])
    assert chat.token_ids == tok.encode("user: the dog")
    with pytest.raises(TokenizeError):
        LocalTokenizer(tmp_path / "missing")
    est = await EstimateTokenizer().tokenize("m", prompt="x" * 40)
    assert est.token_ids is None and est.count == 10 and not est.exact


async def test_cooperative_keys_equal_and_yield_to_the_loop() -> None:
    from epp.datalayer.tokenizer import FastKeyer, keys_cooperative

    tokens = list(range(16 * 1000))
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    t = asyncio.ensure_future(ticker())
    await asyncio.sleep(0)
    for keyer in (EngineKeyer(16), EngineKeyer(16, "sha256_cbor", "7"), FastKeyer(16)):
        start = ticks
        got = await keys_cooperative(keyer, tokens, chunk_blocks=100)
        assert got == keyer.keys(tokens) and len(got) == 1000
        assert ticks - start >= 9  # the loop ran between chunks
    assert await keys_cooperative(EngineKeyer(16), tokens[:15]) == []
    t.cancel()


async def test_engine_tokenization_asks_the_least_busy_engine_and_shares_results() -> None:
    fakes = [FakeVllmTokenize(), FakeVllmTokenize()]
    runners = []
    ports = []
    for fake in fakes:
        app = web.Application()
        app.router.add_post("/tokenize", fake.handle)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        ports.append(site._server.sockets[0].getsockname()[1])  # type: ignore[union-attr]
    ds = Datastore(clock=lambda: NOW)
    ds.replace_endpoints([Endpoint(f"p{i}", "127.0.0.1", p) for i, p in enumerate(ports)])
    keys = [f"127.0.0.1:{p}" for p in ports]
    ds.update_metrics(keys[0], EndpointMetrics(waiting=5, updated_at=NOW))
    ds.update_metrics(keys[1], EndpointMetrics(waiting=0, updated_at=NOW))
    pipe = build_pipeline(load_config_text(LLMD_CONFIG), datastore=ds, rng=random.Random(0))
    prod = producer(pipe)
    try:

        async def prep(prompt: str) -> LLMRequest:
            req = LLMRequest("r", "m", prompt=prompt, body={"model": "m", "prompt": prompt})
            await prod.prepare_data(CycleState(), req, list(ds.snapshot().endpoints))
            return req

        assert (await prep("hello")).token_ids == [ord(c) for c in "hello"]
        assert (len(fakes[0].calls), len(fakes[1].calls)) == (0, 1)  # the idle engine
        ds.update_metrics(keys[1], EndpointMetrics(waiting=9, running=3, updated_at=NOW))
        await prep("hello")  # cached, whichever engine would answer
        await prep("world")
        assert (len(fakes[0].calls), len(fakes[1].calls)) == (1, 1)
        # The chosen engine fails: the next one answers.
        fakes[0].mode = "error"
        assert (await prep("again")).token_ids == [ord(c) for c in "again"]
        assert (len(fakes[0].calls), len(fakes[1].calls)) == (2, 2)
    finally:
        await prod.stop()
        for r in runners:
            await r.cleanup()


def test_engine_keys_include_vllm_extra_keys() -> None:
    from epp.datalayer.tokenizer import RequestExtras
    from pdroute.protocol.blockhash import (
        chain_block_hashes,
        hash_block,
        none_hash,
        sha256_pickle,
        to_event_hash,
    )

    tokens = list(range(48))
    keyer = EngineKeyer(16)
    plain = keyer.keys(tokens)
    # LoRA: the adapter name is an extra key on every block.
    lora = keyer.keys(tokens, RequestExtras(lora_name="sql"))
    assert lora == [to_event_hash(d) for d in chain_block_hashes(tokens, 16, extra_keys=("sql",))]
    # cache_salt: only on the first block; lora first, then salt.
    salted = keyer.keys(tokens, RequestExtras(lora_name="sql", cache_salt="tenant-a"))
    d0 = hash_block(sha256_pickle, none_hash(sha256_pickle), tokens[:16], ("sql", "tenant-a"))
    d1 = hash_block(sha256_pickle, d0, tokens[16:32], ("sql",))
    assert salted[:2] == [to_event_hash(d0), to_event_hash(d1)]
    assert len({plain[0], lora[0], salted[0]}) == 3
    assert keyer.keys(tokens) == plain  # the memo keeps namespaces apart


async def test_cache_salt_and_lora_requests_do_not_match_base_blocks() -> None:
    ds = make_store(2)
    ds.update_metrics(
        "10.0.0.0:8000",
        EndpointMetrics(block_size=16, active_loras=frozenset({"sql"}), updated_at=NOW),
    )
    pipe = build_pipeline(load_config_text(LLMD_CONFIG), datastore=ds, rng=random.Random(0))
    prod = producer(pipe)
    try:
        tokens = list(range(64))
        prod.ingestor.on_message("10.0.0.1:8000", 0, stored_payload(EngineKeyer(16).keys(tokens)))
        cands = list(ds.snapshot().endpoints)
        for model, salt, expect in (("m", "", 4), ("m", "tenant", 0), ("sql", "", 0)):
            req = LLMRequest("r", model, cache_salt=salt, body={"model": model, "prompt": tokens})
            cycle = CycleState()
            await prod.prepare_data(cycle, req, cands)
            prod.produce(cycle, req, cands)
            info = prod.match_info(cycle)
            assert info is not None and info.matches.get("10.0.0.1:8000", 0) == expect
    finally:
        await prod.stop()


def test_pdroute_extension_parameters() -> None:
    cfg = (
        HEAD
        + "plugins:\n- type: precise-prefix-cache-producer\n  parameters:\n"
        + "    kvEventsConfig: {discoverPods: false, receiveHighWaterMark: 500,"
        + " maxMessageBytes: 4096, podDiscoveryConfig: {replaySocketPort: 5558}}\n"
        + "    indexerConfig: {kvBlockIndexConfig: {capacityPerEndpoint: 77, maxEndpoints: 3}}\n"
        + "    speculativeTTL: 500ms\n"
        + "- type: prefix-cache-scorer\n"
    )
    pipe = build_pipeline(load_config_text(cfg), datastore=make_store(1), rng=random.Random(0))
    prod = producer(pipe)
    assert prod._sub_config.rcvhwm == 500
    assert prod.ingestor.max_message_bytes == 4096
    assert prod.replay_port == 5558 and prod._replay_address("10.0.0.0:8000") == (
        "tcp://10.0.0.0:5558"
    )
    assert prod.index.capacity("x") == 77 and prod.index.speculative_ttl_s == 0.5
    for ep in ("a", "b", "c"):
        prod.index.slot(ep)
    with pytest.raises(KeyError):
        prod.index.slot("d")
