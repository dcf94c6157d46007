"""`pdroute sidecar` flags, config errors, serve() lifecycle and graceful shutdown."""

from __future__ import annotations

import argparse
import asyncio
import socket
import ssl
from pathlib import Path

import aiohttp
import orjson
import pytest
from aiohttp import web
from sidecar_fakes import FakeServer, Seen
from vllm_sidecar import cmd
from vllm_sidecar.allowlist import AllowAll, StaticFileAllowlist
from vllm_sidecar.proxy import SidecarProxy

from tests.netutil import free_port


def parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    cmd.add_arguments(p)
    return p.parse_args(list(argv))


def test_defaults_match_llm_d_ports(tmp_path: Path) -> None:
    args = parse("--no-ssrf-protection")
    assert args.port == 8000 and args.model_server_port == 8200
    cfg = cmd.config_from_args(args)
    assert cfg.decoder_url == "http://127.0.0.1:8200"
    assert cfg.on_prefill_failure == "local"
    assert parse("--vllm-port", "9").model_server_port == 9


def test_ssrf_protection_is_required_by_default(tmp_path: Path) -> None:
    with pytest.raises(cmd.ConfigError, match="--endpoints-file"):
        cmd.allowlist_from_args(parse())
    assert isinstance(cmd.allowlist_from_args(parse("--no-ssrf-protection")), AllowAll)
    f = tmp_path / "e.yaml"
    f.write_text("endpoints: [{address: 10.0.0.1, port: 8000}]")
    allow = cmd.allowlist_from_args(parse("--endpoints-file", str(f)))
    assert isinstance(allow, StaticFileAllowlist) and allow.allows("10.0.0.1:8000")
    with pytest.raises(cmd.ConfigError, match="only one"):
        cmd.allowlist_from_args(parse("--endpoints-file", str(f), "--no-ssrf-protection"))
    with pytest.raises(cmd.ConfigError, match=r"--endpoints-file: .*cannot read"):
        cmd.allowlist_from_args(parse("--endpoints-file", str(tmp_path / "missing.yaml")))
    with pytest.raises(cmd.ConfigError, match="NAMESPACE/NAME"):
        cmd.allowlist_from_args(parse("--inference-pool", "justname"))


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--prefiller-ca-file", "x"], "need --prefiller-tls"),
        (["--decoder-tls-insecure-skip-verify"], "need --decoder-tls"),
        (["--prefill-max-retries", "-1"], "--prefill-max-retries"),
        (["--prefill-timeout", "0"], "--prefill-timeout"),
        (["--prefiller-tls", "--prefiller-ca-file", "/nonexistent.pem"], "--prefiller-ca-file"),
    ],
)
def test_config_errors_name_the_flag(argv: list[str], needle: str) -> None:
    with pytest.raises(cmd.ConfigError, match=needle):
        cmd.config_from_args(parse("--no-ssrf-protection", *argv))


def test_tls_flags() -> None:
    cfg = cmd.config_from_args(
        parse(
            "--no-ssrf-protection",
            "--prefiller-tls",
            "--prefiller-tls-insecure-skip-verify",
            "--decoder-tls",
        )
    )
    assert cfg.prefiller_scheme == "https" and cfg.prefiller_ssl is False
    assert cfg.decoder_url.startswith("https://") and cfg.decoder_ssl is None
    with pytest.raises(cmd.ConfigError, match="go together"):
        cmd.server_ssl_from_args(parse("--cert-file", "a"))
    assert cmd.server_ssl_from_args(parse()) is None
    assert isinstance(cmd.server_ssl_from_args(parse("--secure-serving")), ssl.SSLContext)


def test_run_returns_2_on_config_error(caplog: pytest.LogCaptureFixture) -> None:
    assert cmd.run(parse("--port", "1")) == 2
    assert "SSRF protection needs" in caplog.text


async def test_serve_tls_and_graceful_shutdown() -> None:
    decode = FakeServer()
    release = asyncio.Event()

    async def slow(request: web.Request, seen: Seen) -> web.StreamResponse:
        await asyncio.wait_for(release.wait(), 5)
        return web.json_response({"done": True})

    decode.handler = slow
    await decode.start()
    port, mport = free_port(), free_port()
    args = parse(
        "--no-ssrf-protection",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--metrics-port",
        str(mport),
        "--model-server-port",
        str(decode.port),
        "--secure-serving",
    )
    proxy = SidecarProxy(cmd.config_from_args(args), AllowAll())
    stop, started = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(
        cmd.serve(
            proxy,
            host="127.0.0.1",
            port=port,
            metrics_port=mport,
            ssl_context=cmd.server_ssl_from_args(args),
            shutdown_grace_s=5,
            stop=stop,
            started=started,
        )
    )
    await asyncio.wait_for(started.wait(), 5)
    try:
        async with aiohttp.ClientSession() as s:
            async with s.get(f"https://127.0.0.1:{port}/health", ssl=False) as r:
                assert r.status == 200
            async with s.get(f"http://127.0.0.1:{mport}/metrics") as r:
                assert "pdroute_sidecar_requests_total" in await r.text()
            inflight = asyncio.create_task(
                s.post(f"https://127.0.0.1:{port}/v1/completions", data=b"{}", ssl=False)
            )
            for _ in range(500):
                if decode.seen:
                    break
                await asyncio.sleep(0.01)
            stop.set()  # shutdown begins while a request is in flight
            await asyncio.sleep(0.1)
            assert proxy.draining
            assert not task.done()  # waiting for the in-flight request
            release.set()
            resp = await asyncio.wait_for(inflight, 5)
            assert resp.status == 200
            assert orjson.loads(await resp.read()) == {"done": True}
            resp.release()
        await asyncio.wait_for(task, 10)
    finally:
        stop.set()
        release.set()
        if not task.done():
            task.cancel()
        await decode.stop()
    with socket.socket() as sock:  # the port is released
        sock.bind(("127.0.0.1", port))


def test_inference_pool_allowlist_fails_closed_until_synced() -> None:
    from vllm_sidecar.allowlist import MembersAllowlist

    allow = cmd.allowlist_from_args(
        parse("--inference-pool", "ns/pool", "--kube-api-server", "http://127.0.0.1:1")
    )
    assert isinstance(allow, MembersAllowlist)
    assert not allow.allows("10.0.0.1:8000")  # nothing is a member before the first sync
    with pytest.raises(cmd.ConfigError, match="--kube-api-server"):
        cmd.allowlist_from_args(
            parse("--inference-pool", "ns/pool", "--kube-api-server", "ftp://x")
        )
