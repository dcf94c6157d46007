"""The real ``pdroute epp`` process (built-in scheduling config, static endpoint file,
TLS on by default) behind a real Envoy, in front of local backends."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from envoy_stack import Backend, start_backend, until_served  # type: ignore[import-not-found]

from epp.scheduling.plugins.session_affinity_scorer import decode_token
from pdroute.stack.envoy import EnvoyOptions, EnvoyProcess
from tests.netutil import free_port

pytestmark = pytest.mark.envoy


@dataclass
class RealStack:
    backends: list[Backend]
    epp: subprocess.Popen[bytes]
    epp_log: Path
    metrics_port: int
    envoy: EnvoyProcess
    session: aiohttp.ClientSession

    async def post(self, doc: Any) -> tuple[int, Any]:
        async with self.session.post(self.envoy.url + "/v1/completions", json=doc) as r:
            raw = await r.read()
        try:
            return r.status, orjson.loads(raw)
        except orjson.JSONDecodeError:
            return r.status, raw

    async def epp_metrics(self) -> str:
        async with self.session.get(f"http://127.0.0.1:{self.metrics_port}/metrics") as r:
            return await r.text()


def _spawn_epp(
    eps: Path, log: Path, grpc_port: int, health_port: int, metrics_port: int
) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            sys.executable, "-m", "pdroute.cli", "epp", "--host", "127.0.0.1",
            "--endpoints", str(eps), "--grpc-port", str(grpc_port),
            "--grpc-health-port", str(health_port), "--metrics-port", str(metrics_port),
            "--drain-timeout", "2s",
        ],
        stdout=subprocess.DEVNULL,
        stderr=log.open("wb"),
        start_new_session=True,
    )  # fmt: skip


async def _real_stack(
    envoy_binary: str, tmp_path: Path, *, failure_mode_allow: bool, response_headers: bool = True
) -> AsyncIterator[RealStack]:
    backends = [await start_backend() for _ in range(3)]
    eps = tmp_path / "endpoints.yaml"
    eps.write_text(
        "endpoints:\n"
        + "".join(
            f"  - {{name: b{i}, address: 127.0.0.1, port: {b.port}}}\n"
            for i, b in enumerate(backends)
        )
    )
    grpc_port, health_port, metrics_port = free_port(), free_port(), free_port()
    log = tmp_path / "epp.log"
    epp = _spawn_epp(eps, log, grpc_port, health_port, metrics_port)
    envoy = EnvoyProcess(
        EnvoyOptions(
            listen_port=free_port(),
            admin_port=free_port(),
            epp_port=grpc_port,
            pool=[b.key for b in backends],
            epp_tls=True,  # the EPP serves TLS by default (self-signed)
            failure_mode_allow=failure_mode_allow,
            epp_health_interval_s=0.2,
            response_headers=response_headers,
        ),
        binary=envoy_binary,
        workdir=tmp_path / "envoy",
        log_level=os.environ.get("ENVOY_LOG", "warning"),
    )
    session = aiohttp.ClientSession()
    try:
        await asyncio.to_thread(envoy.start)
        try:
            await asyncio.to_thread(envoy.wait_epp_health, True, 30.0)
        except TimeoutError:
            raise AssertionError("EPP never healthy:\n" + log.read_text()[-3000:]) from None
        yield RealStack(backends, epp, log, metrics_port, envoy, session)
    finally:
        await session.close()
        await asyncio.to_thread(envoy.stop)
        if epp.poll() is None:
            os.killpg(epp.pid, signal.SIGKILL)
            epp.wait()
        for b in backends:
            await b.runner.cleanup()


@pytest.fixture
async def real_stack(envoy_binary: str, tmp_path: Path) -> AsyncIterator[RealStack]:
    async for st in _real_stack(envoy_binary, tmp_path, failure_mode_allow=False):
        yield st


@pytest.fixture
async def real_stack_fail_open(envoy_binary: str, tmp_path: Path) -> AsyncIterator[RealStack]:
    async for st in _real_stack(envoy_binary, tmp_path, failure_mode_allow=True):
        yield st


@pytest.fixture(params=["response phase", "no response phase"])
async def stack_either_phase(
    request: pytest.FixtureRequest, envoy_binary: str, tmp_path: Path
) -> AsyncIterator[RealStack]:
    async for st in _real_stack(
        envoy_binary,
        tmp_path,
        failure_mode_allow=False,
        response_headers=request.param == "response phase",
    ):
        yield st


async def test_session_token_with_and_without_the_response_phase(
    stack_either_phase: RealStack,
) -> None:
    """The default config's session tokens reach the client whether Envoy sends
    response headers to the EPP or not (then from the envoy.lb routing metadata, as
    ``pdroute up`` runs it: the default plugins do not need the response phase), and
    a conversation sending the token back stays on its endpoint."""
    st = stack_either_phase
    prompt = "a conversation about endpoint pickers " * 12
    async with st.session.post(
        st.envoy.url + "/v1/completions", json={"model": "tiny", "prompt": prompt}
    ) as r:
        assert r.status == 200
        token = r.headers.get("x-session-token")
        served = (await r.json())["served_by"]
    assert token and decode_token(token) == served
    for i in range(4):
        prompt += f" turn {i} and its answer"
        async with st.session.post(
            st.envoy.url + "/v1/completions",
            json={"model": "tiny", "prompt": prompt},
            headers={"x-session-token": token},
        ) as r:
            assert r.status == 200
            assert (await r.json())["served_by"] == served
            assert r.headers.get("x-session-token") == token


async def test_real_epp_routes_to_pool_members_and_counts(real_stack: RealStack) -> None:
    st = real_stack
    pool = {b.key for b in st.backends}
    for i in range(12):
        status, body = await st.post({"model": "tiny", "prompt": f"request {i} " * 20})
        assert status == 200, body
        assert body["served_by"] in pool
        # The upstream got the EPP's routing header for the endpoint that served it.
        assert body["headers"]["x-gateway-destination-endpoint"].split(",")[0] == body["served_by"]
    text = await st.epp_metrics()
    assert 'llm_d_epp_requests_total{model_name="tiny"} 12.0' in text
    assert "llm_d_epp_pool_ready_endpoints" in text


async def test_real_epp_rejects_bad_requests_as_json(real_stack: RealStack) -> None:
    status, body = await real_stack.post({"prompt": "no model"})
    assert status == 400
    assert body["error"]["type"] == "bad_request" and "model" in body["error"]["message"]
    assert sum(b.hits for b in real_stack.backends) == 0


async def test_sigterm_drains_and_exits_cleanly(real_stack: RealStack) -> None:
    st = real_stack
    status, _ = await st.post({"model": "tiny", "prompt": "hi"})
    assert status == 200
    os.kill(st.epp.pid, signal.SIGTERM)
    code = await asyncio.to_thread(st.epp.wait, 15)
    assert code == 0, st.epp_log.read_text()[-2000:]
    await asyncio.to_thread(st.envoy.wait_epp_health, False)
    status, _ = await st.post({"model": "tiny", "prompt": "hi"})
    assert status >= 500  # fail-closed with the EPP gone


async def test_killed_epp_fails_open_to_pool_members(real_stack_fail_open: RealStack) -> None:
    st = real_stack_fail_open
    os.killpg(st.epp.pid, signal.SIGKILL)
    st.epp.wait()
    await asyncio.to_thread(st.envoy.wait_epp_health, False)
    await until_served(lambda: st.post({"model": "tiny", "prompt": "hi"}))
    pool = {b.key for b in st.backends}
    for _ in range(4):
        status, body = await st.post({"model": "tiny", "prompt": "hi"})
        assert status == 200, body
        assert body["served_by"] in pool
