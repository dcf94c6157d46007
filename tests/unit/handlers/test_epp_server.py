"""The EPP's servers: health readiness, Prometheus metrics, TLS, pool gauges."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from cryptography import x509
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from extproc_fakes import REQUEST_HEADERS, FakeDirector, body_msg, headers_msg, read_n  # type: ignore[import-not-found]
from grpc_health.v1 import health_pb2, health_pb2_grpc

from epp import metrics
from epp.datastore import Datastore, Endpoint, EndpointMetrics
from epp.handlers import StreamHandler
from epp.server import EppServer, ServerOptions
from epp.server.observability import PoolGauges
from epp.server.tls import CertDir, self_signed

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture(params=["h2", "grpcio"])
def transport(request: pytest.FixtureRequest) -> str:
    """Every server test runs on both gRPC transports, with grpc.aio as the client."""
    return str(request.param)


async def check(channel: grpc.aio.Channel, service: str) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    r = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
    return int(r.status)


async def test_health_follows_readiness_and_shutdown(transport: str) -> None:
    ready = {"v": False}
    server = EppServer(
        StreamHandler(FakeDirector()),
        ready=lambda: ready["v"],
        options=ServerOptions(
            host="127.0.0.1", grpc_port=0, health_port=0, metrics_port=0,
            readiness_interval_s=0.02, transport=transport,
        ),
    )  # fmt: skip
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.ports.health}") as ch:
            assert await check(ch, "liveness") == SERVING
            for svc in ("readiness", "", "envoy.service.ext_proc.v3.ExternalProcessor"):
                assert await check(ch, svc) == NOT_SERVING
            ready["v"] = True
            await asyncio.sleep(0.1)
            for svc in ("readiness", "", "envoy.service.ext_proc.v3.ExternalProcessor"):
                assert await check(ch, svc) == SERVING
        # The ext_proc port answers health too (Envoy health-checks the ext_proc cluster).
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.ports.grpc}") as ch:
            assert await check(ch, "envoy.service.ext_proc.v3.ExternalProcessor") == SERVING
            call = pb_grpc.ExternalProcessorStub(ch).Process()
            await call.write(headers_msg(REQUEST_HEADERS))
            await call.write(body_msg(b'{"model": "m"}', eos=True))
            assert len(await read_n(call, 2)) == 2
        # /metrics serves the EPP registry, including what that request recorded.
        url = f"http://127.0.0.1:{server.ports.metrics}/metrics"
        async with aiohttp.ClientSession() as http, http.get(url) as r:
            text = await r.text()
        assert r.status == 200
        assert "llm_d_epp_request_processing_duration_seconds_count" in text
    finally:
        await server.stop(0)


async def test_tls_serving_with_a_self_signed_certificate(tmp_path: Path, transport: str) -> None:
    key, cert = self_signed()
    (tmp_path / "tls.key").write_bytes(key)
    (tmp_path / "tls.crt").write_bytes(cert)
    server = EppServer(
        StreamHandler(FakeDirector()),
        ready=lambda: True,
        options=ServerOptions(
            host="127.0.0.1", grpc_port=0, health_port=0, metrics_port=-1,
            secure_serving=True, cert_path=tmp_path, transport=transport,
        ),
    )  # fmt: skip
    await server.start()
    try:
        creds = grpc.ssl_channel_credentials(root_certificates=cert)
        opts = [("grpc.ssl_target_name_override", "localhost")]
        async with grpc.aio.secure_channel(
            f"127.0.0.1:{server.ports.grpc}", creds, options=opts
        ) as ch:
            assert await check(ch, "liveness") == SERVING
        # A plaintext client cannot talk to the TLS port.
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.ports.grpc}") as ch:
            with pytest.raises(grpc.aio.AioRpcError):
                await check(ch, "liveness")
    finally:
        await server.stop(0)


def test_self_signed_certificate_names_localhost() -> None:
    _, cert = self_signed()
    c = x509.load_pem_x509_certificate(cert)
    san = c.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in san.get_values_for_type(x509.DNSName)


def test_cert_dir_reloads_on_change(tmp_path: Path) -> None:
    key1, cert1 = self_signed("one")
    (tmp_path / "tls.key").write_bytes(key1)
    (tmp_path / "tls.crt").write_bytes(cert1)
    cd = CertDir(tmp_path)
    assert cd.fetch() is None  # unchanged
    key2, cert2 = self_signed("two")
    (tmp_path / "tls.key").write_bytes(key2)
    (tmp_path / "tls.crt").write_bytes(cert2)
    future = time.time() + 5
    for f in ("tls.key", "tls.crt"):
        os.utime(tmp_path / f, (future, future))
    assert cd.fetch() is not None
    assert cd.cert_pem == cert2 and cd.reloads == 1
    # A broken file keeps the previous pair.
    (tmp_path / "tls.crt").write_bytes(b"garbage")
    os.utime(tmp_path / "tls.crt", (future + 5, future + 5))
    assert cd.fetch() is None
    assert cd.cert_pem == cert2


def test_cert_dir_requires_the_pair(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"tls\.crt"):
        CertDir(tmp_path)


def _value(metric: Any, *labels: str) -> float | None:
    for fam in metric.collect():
        for s in fam.samples:
            if tuple(s.labels.values()) == labels:
                return float(s.value)
    return None


def test_pool_gauges_follow_the_datastore() -> None:
    now = [100.0]
    ds = Datastore(clock=lambda: now[0], staleness_s=2.0)
    d = Endpoint("d", "10.1.0.1", 8000, labels={"llm-d.ai/role": "decode"})
    p1 = Endpoint("p1", "10.1.0.2", 8000, labels={"llm-d.ai/role": "prefill"})
    p2 = Endpoint("p2", "10.1.0.3", 8000, labels={"llm-d.ai/role": "prefill"})
    ds.replace_endpoints([d, p1, p2])
    ds.update_metrics(
        d.key, EndpointMetrics(waiting=4, running=2, kv_cache_usage=0.5, updated_at=100)
    )
    ds.update_metrics(p1.key, EndpointMetrics(waiting=2, kv_cache_usage=0.2, updated_at=100))
    ds.update_metrics(p2.key, EndpointMetrics(waiting=0, kv_cache_usage=0.4, updated_at=100))
    g = PoolGauges(ds)
    g.refresh()
    assert _value(metrics.ENDPOINT_QUEUE, d.key, "decode") == 4
    assert _value(metrics.POOL_READY_ENDPOINTS, "prefill") == 2
    assert _value(metrics.POOL_AVG_QUEUE, "prefill") == 1.0
    assert _value(metrics.POOL_AVG_KV, "prefill") == pytest.approx(0.3)
    # p2 leaves and the decode role empties: their series are removed.
    ds.replace_endpoints([p1])
    g.refresh()
    assert _value(metrics.ENDPOINT_QUEUE, p2.key, "prefill") is None
    assert _value(metrics.ENDPOINT_QUEUE, d.key, "decode") is None
    assert _value(metrics.POOL_READY_ENDPOINTS, "decode") is None
    assert _value(metrics.POOL_READY_ENDPOINTS, "prefill") == 1
    # Stale metrics do not count as ready.
    now[0] = 200.0
    g.refresh()
    assert _value(metrics.POOL_READY_ENDPOINTS, "prefill") == 0


async def test_stop_reports_not_serving_before_refusing_streams(transport: str) -> None:
    server = EppServer(
        StreamHandler(FakeDirector()),
        ready=lambda: True,
        options=ServerOptions(
            host="127.0.0.1", grpc_port=0, health_port=0, metrics_port=-1,
            drain_notice_s=0.5, transport=transport,
        ),
    )  # fmt: skip
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.ports.grpc}") as ch:
        assert await check(ch, "readiness") == SERVING
        stopping = asyncio.ensure_future(server.stop(5))
        await asyncio.sleep(0.1)
        # Draining: health says go away, but a stream that still arrives is served.
        assert await check(ch, "readiness") == NOT_SERVING
        call = pb_grpc.ExternalProcessorStub(ch).Process()
        await call.write(headers_msg(REQUEST_HEADERS))
        await call.write(body_msg(b'{"model": "m"}', eos=True))
        assert len(await read_n(call, 2)) == 2
        await call.done_writing()
        await stopping


async def test_renewed_certificate_is_served_to_new_connections(
    tmp_path: Path, transport: str
) -> None:
    key1, cert1 = self_signed("first")
    (tmp_path / "tls.key").write_bytes(key1)
    (tmp_path / "tls.crt").write_bytes(cert1)
    server = EppServer(
        StreamHandler(FakeDirector()),
        ready=lambda: True,
        options=ServerOptions(
            host="127.0.0.1", grpc_port=0, health_port=0, metrics_port=-1,
            secure_serving=True, cert_path=tmp_path, transport=transport,
        ),
    )  # fmt: skip
    await server.start()
    opts = [("grpc.ssl_target_name_override", "localhost")]
    target = f"127.0.0.1:{server.ports.grpc}"
    try:
        creds1 = grpc.ssl_channel_credentials(root_certificates=cert1)
        async with grpc.aio.secure_channel(target, creds1, options=opts) as ch:
            assert await check(ch, "liveness") == SERVING
        key2, cert2 = self_signed("second")
        (tmp_path / "tls.key").write_bytes(key2)
        (tmp_path / "tls.crt").write_bytes(cert2)
        future = time.time() + 5
        for f in ("tls.key", "tls.crt"):
            os.utime(tmp_path / f, (future, future))
        creds2 = grpc.ssl_channel_credentials(root_certificates=cert2)
        async with grpc.aio.secure_channel(target, creds2, options=opts) as ch:
            assert await check(ch, "liveness") == SERVING  # the renewed cert, no restart
        async with grpc.aio.secure_channel(target, creds1, options=opts) as ch:
            with pytest.raises(grpc.aio.AioRpcError):
                await check(ch, "liveness")  # the old cert is no longer served
    finally:
        await server.stop(0)
