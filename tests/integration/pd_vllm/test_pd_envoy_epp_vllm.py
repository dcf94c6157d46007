"""The whole P/D path for real: client -> Envoy -> ext_proc -> ``pdroute epp`` (the
shipped P/D config) -> decode pod's ``pdroute sidecar`` -> prefill vLLM + decode
vLLM (NIXL). The EPP decides: a long uncached prompt is disaggregated, a short
one is not."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from pd_vllm_helpers import REPO, PdPair, SidecarProc, http, metric, post_json

from pdroute.stack.envoy import EnvoyOptions, EnvoyProcess
from tests.netutil import free_port

pytestmark = [pytest.mark.vllm, pytest.mark.envoy, pytest.mark.slow, pytest.mark.timeout(1200)]

PD_CONFIG = REPO / "epp" / "config" / "examples" / "pd.yaml"
LONG = "An endpoint picker scores pods by queue depth, KV-cache usage and prefix affinity. " * 35
SHORT = "Hello world!"


@dataclass
class Gateway:
    envoy: EnvoyProcess
    sidecar: SidecarProc
    epp: subprocess.Popen[bytes]
    epp_log: Path


@pytest.fixture(scope="module")
def gateway(
    vllm_pd: PdPair, envoy_binary: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    d = tmp_path_factory.mktemp("gateway")
    sidecar_port = free_port()
    eps = d / "endpoints.yaml"
    eps.write_text(
        "endpoints:\n"
        f"  - name: decode-0\n    address: 127.0.0.1\n    port: {sidecar_port}\n"
        f"    metricsPort: {vllm_pd.decode.spec.port}\n"
        "    labels: {llm-d.ai/role: decode}\n"
        f"  - name: prefill-0\n    address: 127.0.0.1\n    port: {vllm_pd.prefill.spec.port}\n"
        "    labels: {llm-d.ai/role: prefill}\n"
    )
    sidecar = SidecarProc(vllm_pd.decode.spec.port, eps, d, port=sidecar_port)
    grpc, health, metrics = free_port(), free_port(), free_port()
    epp_log = d / "epp.log"
    with epp_log.open("wb") as log:
        epp = subprocess.Popen(
            [
                sys.executable, "-m", "pdroute.cli", "epp",
                "--host", "127.0.0.1",
                "--grpc-port", str(grpc),
                "--grpc-health-port", str(health),
                "--metrics-port", str(metrics),
                "--config-file", str(PD_CONFIG),
                "--endpoints-file", str(eps),
            ],
            stdout=log, stderr=subprocess.STDOUT, cwd=str(REPO), start_new_session=True,
        )  # fmt: skip
    envoy = EnvoyProcess(
        EnvoyOptions(
            listen_port=free_port(),
            admin_port=free_port(),
            epp_port=grpc,
            epp_tls=True,  # the EPP serves TLS by default (self-signed)
            pool=[sidecar.host_port, vllm_pd.prefill.host_port],
            route_timeout_s=120,
        ),
        binary=envoy_binary,
        workdir=d / "envoy",
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert epp.poll() is None, epp_log.read_text()[-3000:]
            try:
                if http("GET", f"http://127.0.0.1:{metrics}/metrics", timeout=1)[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, epp_log.read_text()[-3000:]
            time.sleep(0.2)
        envoy.start()
        envoy.wait_epp_health(True, timeout_s=30)
        yield Gateway(envoy, sidecar, epp, epp_log)
    finally:
        envoy.stop()
        if epp.poll() is None:
            os.killpg(epp.pid, signal.SIGTERM)
            try:
                epp.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(epp.pid, signal.SIGKILL)
                epp.wait()
        sidecar.stop()


def _complete(url: str, model: str, prompt: str) -> dict:  # type: ignore[type-arg]
    return post_json(
        f"{url}/v1/completions",
        {"model": model, "prompt": prompt, "max_tokens": 16, "temperature": 0},
    )


def test_epp_disaggregates_long_prompt_only(vllm_pd: PdPair, gateway: Gateway) -> None:
    p_srv, d_srv, model = vllm_pd.prefill, vllm_pd.decode, vllm_pd.model
    reference = _complete(p_srv.url, model, LONG)  # single-instance answer
    # Give the EPP a scrape of both pods (it routes on fresh metrics only).
    time.sleep(1.0)

    p_before, d_before = p_srv.metrics_text(), d_srv.metrics_text()
    out = _complete(gateway.envoy.url, model, LONG)
    p_after, d_after = p_srv.metrics_text(), d_srv.metrics_text()
    assert out["choices"][0]["text"] == reference["choices"][0]["text"]
    ext = "vllm:prompt_tokens_by_source_total"
    assert (
        metric(d_after, ext, source="external_kv_transfer")
        - metric(d_before, ext, source="external_kv_transfer")
        >= out["usage"]["prompt_tokens"] - 128
    ), gateway.epp_log.read_text()[-2000:]
    assert metric(p_after, "vllm:request_success_total") > metric(
        p_before, "vllm:request_success_total"
    )
    sm = gateway.sidecar.metrics()
    assert metric(sm, "pdroute_sidecar_requests_total", mode="pd") == 1

    p_before, d_before = p_after, d_after
    out = _complete(gateway.envoy.url, model, SHORT)
    p_after, d_after = p_srv.metrics_text(), d_srv.metrics_text()
    assert out["usage"]["completion_tokens"] == 16
    # Not disaggregated: decode computed it, the prefill pod saw nothing.
    assert metric(p_after, "vllm:request_success_total") == metric(
        p_before, "vllm:request_success_total"
    )
    assert metric(d_after, ext, source="local_compute") > metric(
        d_before, ext, source="local_compute"
    )
    sm = gateway.sidecar.metrics()
    assert metric(sm, "pdroute_sidecar_requests_total", mode="local") == 1
