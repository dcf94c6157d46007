"""``pdroute bbr`` as a process: serves health + ext_proc, stops cleanly on SIGTERM."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import orjson
import pytest
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.netutil import free_port


def _spawn(port: int, extra: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pdroute.cli",
            "bbr",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--max-body-bytes",
            "1000",
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def _stop(proc: subprocess.Popen[bytes]) -> tuple[int, bytes]:
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=10)
    return proc.returncode, out


@pytest.mark.parametrize("tls", [False, True], ids=["plaintext", "tls"])
async def test_pdroute_bbr_process(tls: bool, tmp_path: Path) -> None:
    port = free_port()
    extra: list[str] = []
    channel_creds = None
    if tls:
        from epp.server.tls import self_signed

        key, cert = self_signed()
        (tmp_path / "tls.key").write_bytes(key)
        (tmp_path / "tls.crt").write_bytes(cert)
        extra = ["--secure-serving", "--cert-path", str(tmp_path)]
        channel_creds = grpc.ssl_channel_credentials(root_certificates=cert)
    proc = await asyncio.to_thread(_spawn, port, extra)
    target = f"127.0.0.1:{port}"
    try:
        async with (
            grpc.aio.secure_channel(target, channel_creds)
            if channel_creds is not None
            else grpc.aio.insecure_channel(target)
        ) as ch:
            health = health_pb2_grpc.HealthStub(ch)
            status = None
            # Start-up imports grpc, protobufs and TLS: seconds on a loaded machine.
            deadline = asyncio.get_running_loop().time() + 60.0
            while asyncio.get_running_loop().time() < deadline:
                try:
                    r = await health.Check(
                        health_pb2.HealthCheckRequest(
                            service="envoy.service.ext_proc.v3.ExternalProcessor"
                        ),
                        timeout=0.5,
                    )
                    status = r.status
                    break
                except grpc.aio.AioRpcError:
                    assert proc.poll() is None, "pdroute bbr exited early"
                    await asyncio.sleep(0.05)
            assert status == health_pb2.HealthCheckResponse.SERVING

            call = pb_grpc.ExternalProcessorStub(ch).Process()
            req = pb.ProcessingRequest(request_headers=pb.HttpHeaders(end_of_stream=False))
            req.protocol_config.request_body_mode = (
                processing_mode_pb2.ProcessingMode.FULL_DUPLEX_STREAMED
            )  # type: ignore[assignment]
            await call.write(req)
            await call.write(
                pb.ProcessingRequest(
                    request_body=pb.HttpBody(
                        body=orjson.dumps({"model": "m", "p": "x" * 2000}), end_of_stream=True
                    )
                )
            )
            r = await call.read()
            assert r.immediate_response.status.code == 413  # --max-body-bytes 1000 applied
    finally:
        code, out = await asyncio.to_thread(_stop, proc)
    assert code == 0, out.decode()
    assert b"bbr listening on 127.0.0.1" in out


def test_pdroute_bbr_start_up_errors_are_one_line() -> None:
    """A port in use or a bad flag exits 2 with a message, not a traceback."""
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = _spawn(port, [])
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 2, out.decode()
    assert f"cannot listen on 127.0.0.1:{port}".encode() in out
    assert b"Traceback" not in out
    proc = _spawn(free_port(), ["--log-level", "loud"])
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 2 and b"--log-level: unknown level 'loud'" in out
    assert b"Traceback" not in out
