"""``pdroute sidecar`` as a real process in front of simulated vLLMs (pdroute.sim) that
speak NixlConnector's protocol: the handoff through the sidecar, then the prefill
pod killed for real, under both failure policies. Fast-tier twin of the vLLM test
in tests/integration/pd_vllm/."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from pdroute.sim.config import SimConfig
from pdroute.sim.fleet import SimFleet
from pdroute.sim.latency import get_profile
from tests.netutil import free_port

REPO = Path(__file__).resolve().parents[3]
PROMPT = "Disaggregated serving splits prefill and decode across pods. " * 12
EXT = 'vllm:prompt_tokens_by_source_total{engine="0",model_name="m",source="external_kv_transfer"}'


def cfg(role: str) -> SimConfig:
    return SimConfig(
        model="m",
        profile=get_profile("fast"),
        block_size=16,
        num_blocks=256,
        role=role,
        kv_bytes_per_block=2048,
    )


class Sidecar:
    def __init__(self, decode: str, endpoints: Path, log: Path, *extra: str) -> None:
        self.port, self.metrics_port = free_port(), free_port()
        host, _, dport = decode.rpartition(":")
        argv = [
            sys.executable, "-m", "pdroute.cli", "sidecar",
            "--host", "127.0.0.1", "--port", str(self.port),
            "--metrics-port", str(self.metrics_port),
            "--model-server-host", host, "--model-server-port", dport,
            "--endpoints-file", str(endpoints),
            "--prefill-max-retries", "1", "--prefill-retry-backoff", "0.01",
            *extra,
        ]  # fmt: skip
        self.log = log
        with log.open("wb") as f:
            self.proc = subprocess.Popen(
                argv, stdout=f, stderr=subprocess.STDOUT, cwd=str(REPO), start_new_session=True
            )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def wait(self, http: aiohttp.ClientSession) -> None:
        for _ in range(300):
            assert self.proc.poll() is None, self.log.read_text()[-2000:]
            try:
                async with http.get(f"{self.url}/health") as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
        raise AssertionError(self.log.read_text()[-2000:])

    def stop(self) -> int:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


async def metric(http: aiohttp.ClientSession, url: str, needle: str) -> float:
    async with http.get(f"{url}/metrics") as r:
        total = 0.0
        for line in (await r.text()).splitlines():
            if line.startswith(needle):
                total += float(line.rsplit(" ", 1)[1])
        return total


async def complete(
    http: aiohttp.ClientSession, url: str, headers: dict[str, str] | None = None, **kw: Any
) -> tuple[int, Any]:
    body = {"model": "m", "prompt": PROMPT, "max_tokens": 6, **kw}
    async with http.post(f"{url}/v1/completions", json=body, headers=headers or {}) as r:
        return r.status, await r.json()


async def test_sidecar_pd_handoff_and_killed_prefiller(
    http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    p = SimFleet(cfg("prefill"))
    async with SimFleet(cfg("decode")) as d:
        await p.__aenter__()
        prefill_addr = p.addresses[0]
        eps = tmp_path / "endpoints.yaml"
        host, _, port = prefill_addr.rpartition(":")
        eps.write_text(f"endpoints: [{{address: '{host}', port: {port}}}]\n")
        local = Sidecar(d.addresses[0], eps, tmp_path / "local.log")
        error = Sidecar(
            d.addresses[0], eps, tmp_path / "error.log", "--on-prefill-failure", "error"
        )
        try:
            await local.wait(http)
            await error.wait(http)
            durl = f"http://{d.addresses[0]}"
            status, single = await complete(http, f"http://{prefill_addr}")
            assert status == 200

            before = await metric(http, durl, EXT)
            status, out = await complete(http, local.url, {"x-prefiller-host-port": prefill_addr})
            assert status == 200, out
            assert out["choices"][0]["text"] == single["choices"][0]["text"]
            n_prompt = out["usage"]["prompt_tokens"]
            assert await metric(http, durl, EXT) - before == n_prompt  # all pulled
            # The prefiller served the reference first: its prefix-cache hit is reported.
            assert 0 < out["usage"]["prompt_tokens_details"]["cached_tokens"] < n_prompt
            # Streaming through the sidecar.
            body = {"model": "m", "prompt": PROMPT, "max_tokens": 6, "stream": True}
            async with http.post(
                f"{local.url}/v1/completions",
                json={**body, "stream_options": {"include_usage": True}},
                headers={"x-prefiller-host-port": prefill_addr},
            ) as r:
                assert r.status == 200
                raw = await r.read()
            assert raw.rstrip().endswith(b"data: [DONE]")
            # Decode now holds the prompt's full blocks itself: only the tail is pulled.
            assert await metric(http, durl, EXT) - before > n_prompt

            # Kill the prefill pod for real.
            await p.__aexit__(None, None, None)
            before = await metric(http, durl, EXT)
            status, out = await complete(http, local.url, {"x-prefiller-host-port": prefill_addr})
            assert status == 200  # local policy: decoded locally
            assert out["choices"][0]["text"] == single["choices"][0]["text"]
            assert await metric(http, durl, EXT) == before
            assert (
                await metric(
                    http,
                    f"http://127.0.0.1:{local.metrics_port}",
                    'pdroute_sidecar_prefill_fallbacks_total{reason="connect"}',
                )
                == 1
            )
            status, err = await complete(http, error.url, {"x-prefiller-host-port": prefill_addr})
            assert status == 502
            assert err["error"]["type"] == "prefill_failed"
            assert err["error"]["prefiller"] == prefill_addr
        finally:
            codes = [local.stop(), error.stop()]
            if p.servers:
                await p.__aexit__(None, None, None)
        assert codes == [0, 0]
