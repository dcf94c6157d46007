"""The real ``pdroute epp`` process discovering its pool through a real kube-apiserver.

Readiness is read the way Envoy and the kubelet read it: the gRPC health service
(``readiness``) on ``--grpc-health-port``. Two replicas with leader election: exactly
one is SERVING; SIGKILL the leader and the other turns SERVING within the lease bound.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from kube_helpers import Admin, KubeCluster, wait_for

from tests.netutil import free_port

pytestmark = pytest.mark.kube

REPO_ROOT = Path(__file__).resolve().parents[3]


class Epp:
    def __init__(self, cluster: KubeCluster, ns: str, *extra: str) -> None:
        self.health_port = free_port()
        self.log = tempfile.NamedTemporaryFile(prefix="epp-", suffix=".log", delete=False)  # noqa: SIM115
        argv = [
            sys.executable,
            "-m",
            "pdroute.cli",
            "epp",
            "--host",
            "127.0.0.1",
            "--grpc-port",
            str(free_port()),
            "--grpc-health-port",
            str(self.health_port),
            "--metrics-port",
            "-1",
            "--no-secure-serving",
            "--pool-namespace",
            ns,
            "--kube-api-server",
            cluster.url,
            "--kube-token-file",
            cluster.token_file,
            "--kube-ca-file",
            cluster.ca_file,
            *extra,
        ]
        self.proc = subprocess.Popen(
            argv, stdout=self.log, stderr=subprocess.STDOUT, cwd=REPO_ROOT, env=dict(os.environ)
        )

    def status(self) -> int | None:
        """Health status of ``readiness`` (1 SERVING, 2 NOT_SERVING) or None (no answer)."""
        try:
            with grpc.insecure_channel(f"127.0.0.1:{self.health_port}") as ch:
                resp = health_pb2_grpc.HealthStub(ch).Check(
                    health_pb2.HealthCheckRequest(service="readiness"), timeout=1.0
                )
                return int(resp.status)
        except grpc.RpcError:
            return None

    def output(self) -> str:
        return Path(self.log.name).read_text()[-3000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log.close()
        os.unlink(self.log.name)


@pytest.fixture
def epps() -> Iterator[list[Epp]]:
    started: list[Epp] = []
    yield started
    for e in started:
        e.stop()


SERVING, NOT_SERVING = 1, 2


async def status(e: Epp) -> int | None:
    return await asyncio.to_thread(e.status)


async def test_epp_process_turns_ready_from_the_pool(
    kube_cluster: KubeCluster, admin: Admin, epps: list[Epp]
) -> None:
    ns = await admin.namespace()
    await admin.create_pod(ns, "a", {"app": "m"}, ip="10.5.0.1")
    epp = Epp(kube_cluster, ns, "--pool-name", "pool")
    epps.append(epp)
    states: list[int | None] = []

    async def poll() -> None:
        states.append(await status(epp))

    deadline = time.monotonic() + 60
    while not states or states[-1] != NOT_SERVING:
        assert epp.proc.poll() is None, epp.output()
        assert time.monotonic() < deadline, f"EPP health never answered:\n{epp.output()}"
        await poll()
        await asyncio.sleep(0.2)
    # No pool yet: alive but not ready.
    await admin.create_pool(ns, "pool", {"app": "m"}, [8000])
    deadline = time.monotonic() + 30
    while states[-1] != SERVING:
        assert time.monotonic() < deadline, f"EPP never turned ready:\n{epp.output()}"
        await asyncio.sleep(0.1)
        await poll()
    await admin.delete_pool(ns, "pool")
    deadline = time.monotonic() + 30
    while states[-1] != NOT_SERVING:
        assert time.monotonic() < deadline, f"EPP stayed ready without a pool:\n{epp.output()}"
        await asyncio.sleep(0.1)
        await poll()


async def test_two_epp_replicas_active_passive_failover(
    kube_cluster: KubeCluster, admin: Admin, epps: list[Epp]
) -> None:
    ns = await admin.namespace()
    await admin.create_pool(ns, "pool", {"app": "m"}, [8000])
    await admin.create_pod(ns, "a", {"app": "m"}, ip="10.6.0.1")
    ha = [
        "--pool-name",
        "pool",
        "--ha-enable-leader-election",
        "--ha-lease-duration",
        "3",
        "--ha-renew-deadline",
        "2",
        "--ha-retry-period",
        "0.5",
    ]
    epps.extend(Epp(kube_cluster, ns, *ha, "--ha-identity", f"epp-{i}") for i in range(2))
    current: list[int | None] = [None, None]

    async def refresh() -> None:
        current[:] = await asyncio.gather(*(status(e) for e in epps))

    deadline = time.monotonic() + 60
    while sorted(map(str, current)) != ["1", "2"]:
        for e in epps:
            assert e.proc.poll() is None, e.output()
        assert time.monotonic() < deadline, f"no single leader: {current}\n{epps[0].output()}"
        await asyncio.sleep(0.2)
        await refresh()
    leader = current.index(SERVING)
    follower = 1 - leader
    epps[leader].proc.send_signal(signal.SIGKILL)  # crash: no lease release
    killed_at = time.monotonic()
    await wait_for(lambda: epps[follower].status() == SERVING, "follower takes over", 3 + 0.5 + 10)
    failover_s = time.monotonic() - killed_at
    print(f"\nKUBE-EPP-FAILOVER {{'failover_after_sigkill_s': {failover_s:.2f}, 'bound_s': 3.5}}")
