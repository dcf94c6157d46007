"""Envoy -> ``pdroute epp`` (shipped P/D config) -> ``pdroute sidecar`` -> simulated
prefill/decode pods, every piece a real process. The EPP decides per request:
a long uncached prompt is disaggregated (prefill leg runs, decode pulls the KV),
a short one is not. Fast-tier twin of tests/integration/pd_vllm/test_pd_envoy_epp_vllm.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from pdroute.stack.envoy import EnvoyOptions, EnvoyProcess
from tests.netutil import free_port

pytestmark = pytest.mark.envoy

REPO = Path(__file__).resolve().parents[3]
PD_CONFIG = REPO / "epp" / "config" / "examples" / "pd.yaml"
EXT = 'vllm:prompt_tokens_by_source_total{engine="0",model_name="m",source="external_kv_transfer"}'
LOCAL = 'vllm:prompt_tokens_by_source_total{engine="0",model_name="m",source="local_compute"}'


def http(
    method: str, url: str, body: Any = None, headers: dict[str, str] | None = None
) -> tuple[int, bytes]:
    data = orjson.dumps(body) if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return int(r.status), r.read()
    except urllib.error.HTTPError as e:
        return int(e.code), e.read()


def metric(url: str, needle: str) -> float:
    text = http("GET", f"{url}/metrics")[1].decode()
    return sum(float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines() if ln.startswith(needle))


def wait_http(url: str, proc: subprocess.Popen[bytes], log: Path, within: float = 30) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()[-3000:]
        try:
            if http("GET", url)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"{url} not ready:\n{log.read_text()[-3000:]}")


class Stack:
    def __init__(self, work: Path, envoy_binary: str) -> None:
        self.work = work
        self.procs: list[subprocess.Popen[bytes]] = []
        self.envoy: EnvoyProcess | None = None
        try:
            self._start(envoy_binary)
        except BaseException:
            self.stop()  # a failed start must not leave processes behind
            raise

    def _start(self, envoy_binary: str) -> None:
        work = self.work
        self.prefill, self.decode = free_port(), free_port()
        for port, role in ((self.prefill, "prefill"), (self.decode, "decode")):
            self._spawn(
                f"sim-{role}",
                "sim", "--port", str(port), "--role", role, "--model", "m",
                "--side-channel-port", str(free_port()),
            )  # fmt: skip
        self.sidecar, self.sidecar_metrics = free_port(), free_port()
        eps = work / "endpoints.yaml"
        eps.write_text(
            "endpoints:\n"
            f"  - {{name: decode-0, address: 127.0.0.1, port: {self.sidecar},"
            f" metricsPort: {self.decode}, labels: {{llm-d.ai/role: decode}}}}\n"
            f"  - {{name: prefill-0, address: 127.0.0.1, port: {self.prefill},"
            " labels: {llm-d.ai/role: prefill}}\n"
        )
        sc = self._spawn(
            "sidecar",
            "sidecar", "--host", "127.0.0.1", "--port", str(self.sidecar),
            "--metrics-port", str(self.sidecar_metrics),
            "--model-server-port", str(self.decode), "--endpoints-file", str(eps),
        )  # fmt: skip
        grpc, health, epp_metrics = free_port(), free_port(), free_port()
        epp = self._spawn(
            "epp",
            "epp", "--host", "127.0.0.1", "--grpc-port", str(grpc),
            "--grpc-health-port", str(health), "--metrics-port", str(epp_metrics),
            "--config-file", str(PD_CONFIG), "--endpoints-file", str(eps),
        )  # fmt: skip
        for port, proc, name in (
            (self.prefill, self.procs[0], "sim-prefill"),
            (self.decode, self.procs[1], "sim-decode"),
        ):
            wait_http(f"http://127.0.0.1:{port}/health", proc, work / f"{name}.log")
        wait_http(f"http://127.0.0.1:{self.sidecar}/health", sc, work / "sidecar.log")
        wait_http(f"http://127.0.0.1:{epp_metrics}/metrics", epp, work / "epp.log")
        self.envoy = EnvoyProcess(
            EnvoyOptions(
                listen_port=free_port(),
                admin_port=free_port(),
                epp_port=grpc,
                epp_tls=True,
                pool=[f"127.0.0.1:{self.sidecar}", f"127.0.0.1:{self.prefill}"],
            ),
            binary=envoy_binary,
            workdir=work / "envoy",
        )
        self.envoy.start()
        self.envoy.wait_epp_health(True, timeout_s=30)

    def _spawn(self, name: str, *argv: str) -> subprocess.Popen[bytes]:
        with (self.work / f"{name}.log").open("wb") as log:
            p = subprocess.Popen(
                [sys.executable, "-m", "pdroute.cli", *argv],
                stdout=log, stderr=subprocess.STDOUT, cwd=str(REPO), start_new_session=True,
            )  # fmt: skip
        self.procs.append(p)
        return p

    @property
    def url(self) -> str:
        assert self.envoy is not None
        return self.envoy.url

    def stop(self) -> None:
        if self.envoy is not None:
            self.envoy.stop()
        for p in reversed(self.procs):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


@pytest.fixture
def stack(tmp_path: Path, envoy_binary: str) -> Iterator[Stack]:
    s = Stack(tmp_path, envoy_binary)
    try:
        yield s
    finally:
        s.stop()


def test_epp_decides_long_prompt_disaggregated_short_not(stack: Stack) -> None:
    p_url, d_url = f"http://127.0.0.1:{stack.prefill}", f"http://127.0.0.1:{stack.decode}"
    sc_metrics = f"http://127.0.0.1:{stack.sidecar_metrics}"
    long_prompt = "An endpoint picker scores pods by queue depth and prefix affinity. " * 20

    status, raw = http(
        "POST",
        f"{stack.url}/v1/completions",
        {"model": "m", "prompt": long_prompt, "max_tokens": 4},
        {"x-prefiller-host-port": "10.6.6.6:80"},  # a client cannot pick the prefiller
    )
    assert status == 200, raw[:500]
    n_prompt = orjson.loads(raw)["usage"]["prompt_tokens"]
    assert metric(d_url, EXT) == n_prompt  # decode pulled the whole prompt
    assert metric(d_url, LOCAL) == 0
    assert metric(p_url, LOCAL) == n_prompt  # the prefill pod computed it
    assert metric(sc_metrics, 'pdroute_sidecar_requests_total{code="200",mode="pd"}') == 1
    assert metric(sc_metrics, "pdroute_sidecar_rejected_requests_total") == 0

    status, raw = http(
        "POST",
        f"{stack.url}/v1/completions",
        {"model": "m", "prompt": "Hi!", "max_tokens": 4},
    )
    assert status == 200, raw[:500]
    assert metric(p_url, LOCAL) == n_prompt  # prefill pod untouched
    assert metric(d_url, LOCAL) > 0
    assert metric(sc_metrics, 'pdroute_sidecar_requests_total{code="200",mode="local"}') == 1
