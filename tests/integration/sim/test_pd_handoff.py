"""P/D between two simulators, NixlConnector-style: params, byte-exact pull, failures."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from pdroute.protocol.kv_transfer import PREFILL_REQUEST_PARAMS, PREFILL_RESPONSE_FIELDS
from pdroute.sim.config import SimConfig
from pdroute.sim.fleet import SimFleet
from pdroute.sim.latency import get_profile
from tests.netutil import free_port

PROMPT = "Disaggregated serving splits prefill and decode across pods. " * 12


def cfg(role: str, **kw: Any) -> SimConfig:
    return SimConfig(
        model="m",
        profile=get_profile("fast"),
        block_size=16,
        num_blocks=256,
        role=role,
        kv_bytes_per_block=2048,
        **kw,
    )


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


async def post(http: aiohttp.ClientSession, addr: str, body: dict[str, Any]) -> tuple[int, Any]:
    async with http.post(f"http://{addr}/v1/completions", json=body) as r:
        return r.status, await r.json()


async def metric(http: aiohttp.ClientSession, addr: str, needle: str) -> float:
    async with http.get(f"http://{addr}/metrics") as r:
        for line in (await r.text()).splitlines():
            if line.startswith(needle):
                return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{needle} not in metrics of {addr}")


async def prefill(http: aiohttp.ClientSession, addr: str) -> dict[str, Any]:
    status, j = await post(
        http,
        addr,
        {
            "model": "m",
            "prompt": PROMPT,
            "max_tokens": 1,
            "kv_transfer_params": dict(PREFILL_REQUEST_PARAMS),
        },
    )
    assert status == 200, j
    ktp: dict[str, Any] = j["kv_transfer_params"]
    return ktp


async def test_handoff_pulls_blocks_intact(http: aiohttp.ClientSession) -> None:
    async with SimFleet(cfg("prefill")) as p, SimFleet(cfg("decode")) as d:
        ktp = await prefill(http, p.addresses[0])
        # Exactly the field set real vLLM 0.32 NixlConnector returns.
        assert tuple(ktp) == PREFILL_RESPONSE_FIELDS
        assert ktp["do_remote_prefill"] is True and ktp["do_remote_decode"] is False
        assert ktp["transfer_mode"] == "pull" and ktp["remote_blocks_expiry_time"] is None
        assert ktp["remote_port"] == p.side_channel_ports[0]
        assert ktp["remote_request_id"].startswith("cmpl-")
        n_prompt = ktp["remote_num_tokens"]
        n_blocks = -(-n_prompt // 16)
        assert len(ktp["remote_block_ids"]) == 1 and len(ktp["remote_block_ids"][0]) == n_blocks
        lease_usage = p.servers[0].pool.usage()
        assert lease_usage > 0  # blocks held for the pull

        status, j = await post(
            http,
            d.addresses[0],
            {"model": "m", "prompt": PROMPT, "max_tokens": 6, "kv_transfer_params": ktp},
        )
        assert status == 200, j
        assert j["usage"]["prompt_tokens"] == n_prompt
        assert j["usage"]["prompt_tokens_details"]["cached_tokens"] == n_prompt
        assert j["kv_transfer_params"] is None

        da = d.addresses[0]
        assert (
            await metric(
                http,
                da,
                'vllm:prompt_tokens_by_source_total{engine="0",model_name="m",source="external_kv_transfer"}',
            )
            == n_prompt
        )
        assert (
            await metric(
                http,
                da,
                'vllm:prompt_tokens_by_source_total{engine="0",model_name="m",source="local_compute"}',
            )
            == 0
        )
        assert await metric(http, da, "vllm:nixl_bytes_transferred_sum") == n_blocks * 2048
        assert await metric(http, da, "vllm:nixl_num_descriptors_sum") == n_blocks
        assert await metric(http, da, "vllm:nixl_num_failed_transfers_total") == 0
        # The prefill side freed its lease after the decode's notification.
        assert not p.servers[0].engine.leases
        # Decode output equals a single (non-disaggregated) instance's output.
        status, single = await post(
            http, p.addresses[0], {"model": "m", "prompt": PROMPT, "max_tokens": 6}
        )
        assert single["choices"][0]["text"] == j["choices"][0]["text"]


async def test_expired_lease_fails_with_500(http: aiohttp.ClientSession) -> None:
    async with SimFleet(cfg("prefill", lease_seconds=0.05)) as p, SimFleet(cfg("decode")) as d:
        ktp = await prefill(http, p.addresses[0])
        import asyncio

        await asyncio.sleep(0.2)
        assert not p.servers[0].engine.leases  # expired while idle
        assert p.servers[0].stats.nixl.kv_expired_reqs == 1
        status, j = await post(
            http, d.addresses[0], {"prompt": PROMPT, "max_tokens": 3, "kv_transfer_params": ktp}
        )
        assert status == 500
        assert j["error"]["type"] == "InternalServerError" and "lease" in j["error"]["message"]
        assert await metric(http, d.addresses[0], "vllm:nixl_num_failed_transfers_total") == 1
        # The decode server stays healthy.
        status, _ = await post(http, d.addresses[0], {"prompt": "ok", "max_tokens": 1})
        assert status == 200


async def test_dead_source_fails_with_500_after_timeout(http: aiohttp.ClientSession) -> None:
    async with SimFleet(cfg("decode", transfer_timeout=0.3)) as d:
        ktp = {
            "do_remote_prefill": True,
            "do_remote_decode": False,
            "remote_block_ids": [[1, 2]],
            "remote_engine_id": "gone",
            "remote_request_id": "cmpl-x",
            "remote_host": "127.0.0.1",
            "remote_port": free_port(),
            "remote_num_tokens": 20,
        }
        status, j = await post(
            http, d.addresses[0], {"prompt": PROMPT, "max_tokens": 3, "kv_transfer_params": ktp}
        )
        assert status == 500
        assert "handshake_failed" in j["error"]["message"]
        assert d.servers[0].pool.usage() == 0.0


async def test_wrong_engine_id_is_refused(http: aiohttp.ClientSession) -> None:
    async with SimFleet(cfg("both"), replicas=2) as f:
        ktp = await prefill(http, f.addresses[0])
        bad = {**ktp, "remote_engine_id": "someone-else"}
        status, j = await post(
            http, f.addresses[1], {"prompt": PROMPT, "max_tokens": 2, "kv_transfer_params": bad}
        )
        assert status == 500 and "engine" in j["error"]["message"]
        # A different prompt does not verify against the leased blocks' contents.
        status, j = await post(
            http,
            f.addresses[1],
            {"prompt": PROMPT + " changed", "max_tokens": 2, "kv_transfer_params": ktp},
        )
        assert status == 500
        assert "mismatch" in j["error"]["message"] or "expected" in j["error"]["message"]


async def test_incomplete_params_are_400(http: aiohttp.ClientSession) -> None:
    async with SimFleet(cfg("decode")) as d:
        status, j = await post(
            http, d.addresses[0], {"prompt": "x", "kv_transfer_params": {"do_remote_prefill": True}}
        )
        assert status == 400 and j["error"]["param"] == "kv_transfer_params"


async def test_streaming_decode_after_prefill(http: aiohttp.ClientSession) -> None:
    async with SimFleet(cfg("both"), replicas=2) as f:
        ktp = await prefill(http, f.addresses[0])
        body = {
            "prompt": PROMPT,
            "max_tokens": 3,
            "stream": True,
            "stream_options": {"include_usage": True},
            "kv_transfer_params": ktp,
        }
        async with http.post(f"http://{f.addresses[1]}/v1/completions", json=body) as r:
            assert r.status == 200
            text = await r.text()
        assert text.count("data: ") == 5 and text.endswith("data: [DONE]\n\n")


async def test_nixl_required_but_missing_fails_clearly() -> None:
    from pdroute.sim.nixl_kv import nixl_available

    assert not nixl_available()  # the dev environment does not ship nixl
    fleet = SimFleet(cfg("decode", kv_transport="nixl"))
    with pytest.raises(RuntimeError, match="kv_transport"):
        await fleet.start()
    # auto falls back to the TCP side channel
    async with SimFleet(cfg("both", kv_transport="auto")) as f:
        assert f.servers[0].nixl is None
