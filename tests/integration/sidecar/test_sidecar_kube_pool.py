"""SSRF guard from a live InferencePool: ``pdroute sidecar --inference-pool ns/name``
against a real etcd + kube-apiserver (scripts/kube-apiserver.sh). A prefill target
is allowed only while it is a ready pod of the pool on one of its target ports."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from pdroute.sim.config import SimConfig
from pdroute.sim.fleet import SimFleet
from pdroute.sim.latency import get_profile

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO / "tests" / "integration" / "kube"))
from kube_helpers import Admin, admin_client  # type: ignore[import-not-found]  # noqa: E402

from tests.kubeapi import KubeCluster, private_control_plane  # noqa: E402
from tests.netutil import free_port  # noqa: E402

pytestmark = pytest.mark.kube

PROMPT = "Disaggregated serving splits prefill and decode across pods. " * 8


@pytest.fixture(scope="module")
def cluster() -> Iterator[KubeCluster]:
    with private_control_plane("pdroute-sidecar-kube-") as c:
        yield c


@pytest.fixture
async def admin(cluster: KubeCluster) -> AsyncIterator[Admin]:
    async with admin_client(cluster) as a:
        yield a


def cfg(role: str) -> SimConfig:
    return SimConfig(
        model="m",
        profile=get_profile("fast"),
        block_size=16,
        num_blocks=256,
        role=role,
        kv_bytes_per_block=2048,
    )


def start_sidecar(
    port: int, decode: str, pool: str, cluster: KubeCluster, log: Path
) -> subprocess.Popen[bytes]:
    with log.open("wb") as f:
        return subprocess.Popen(
            [
                sys.executable, "-m", "pdroute.cli", "sidecar",
                "--host", "127.0.0.1", "--port", str(port), "--metrics-port", "0",
                "--model-server-port", decode.rpartition(":")[2],
                "--on-prefill-failure", "error",
                "--inference-pool", pool,
                "--kube-api-server", cluster.url,
                "--kube-token-file", cluster.token_file,
                "--kube-ca-file", cluster.ca_file,
            ],
            stdout=f, stderr=subprocess.STDOUT, cwd=str(REPO), start_new_session=True,
        )  # fmt: skip


async def pd_status(http: aiohttp.ClientSession, url: str, target: str) -> tuple[int, Any]:
    body = {"model": "m", "prompt": PROMPT, "max_tokens": 3}
    async with http.post(
        f"{url}/v1/completions", json=body, headers={"x-prefiller-host-port": target}
    ) as r:
        return r.status, await r.json()


async def wait_status(
    http: aiohttp.ClientSession, url: str, target: str, want: int, within: float = 30
) -> Any:
    deadline = asyncio.get_running_loop().time() + within
    while True:
        status, body = await pd_status(http, url, target)
        if status == want:
            return body
        assert asyncio.get_running_loop().time() < deadline, (status, body)
        await asyncio.sleep(0.2)


async def test_prefill_targets_follow_the_live_pool(
    cluster: KubeCluster, admin: Admin, tmp_path: Path
) -> None:
    ns = await admin.namespace()
    async with SimFleet(cfg("prefill")) as p, SimFleet(cfg("decode")) as d:
        prefill_port = int(p.addresses[0].rpartition(":")[2])
        await admin.create_pool(ns, "pool", {"app": "vllm"}, [prefill_port])
        await admin.create_pod(ns, "prefill-0", {"app": "vllm"}, ip="127.0.0.1", ready=True)
        port = free_port()
        log = tmp_path / "sidecar.log"
        proc = start_sidecar(port, d.addresses[0], f"{ns}/pool", cluster, log)
        url = f"http://127.0.0.1:{port}"
        try:
            async with aiohttp.ClientSession() as http:
                for _ in range(300):
                    assert proc.poll() is None, log.read_text()[-2000:]
                    try:
                        async with http.get(f"{url}/health") as r:
                            if r.status == 200:
                                break
                    except aiohttp.ClientError:
                        pass
                    await asyncio.sleep(0.1)
                member = f"127.0.0.1:{prefill_port}"
                out = await wait_status(http, url, member, 200)
                assert out["usage"]["prompt_tokens"] > 0
                # Same IP, a port that is not a target port of the pool: refused.
                status, err = await pd_status(http, url, f"127.0.0.1:{free_port()}")
                assert status == 403 and "SSRF" in err["error"]["message"]
                # The pod turns unready: it leaves the pool, and the allowlist follows.
                await admin.set_pod_status(ns, "prefill-0", ip="127.0.0.1", ready=False)
                await wait_status(http, url, member, 403)
                await admin.set_pod_status(ns, "prefill-0", ip="127.0.0.1", ready=True)
                await wait_status(http, url, member, 200)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
        assert proc.returncode == 0, log.read_text()[-2000:]
