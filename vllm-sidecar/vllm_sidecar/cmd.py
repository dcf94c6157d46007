"""``pdroute sidecar``: flags, wiring and the process lifecycle of the P/D sidecar.

Wiring: flags -> :class:`~vllm_sidecar.proxy.SidecarConfig`; an allowlist
(endpoint file, Kubernetes pool, or off); the proxy app on ``--port`` and its
metrics on ``--metrics-port`` in the same event loop (uvloop when installed).

Shutdown (SIGTERM/SIGINT): ``/health`` turns 503 at once (so the kubelet and
Envoy stop sending), the listener closes, in-flight requests get
``--shutdown-grace`` seconds to finish, then the process exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import ssl
import tempfile
from pathlib import Path
from typing import Any

from aiohttp import web

from vllm_sidecar.allowlist import (
    AllowAll,
    Allowlist,
    AllowlistError,
    MembersAllowlist,
    StaticFileAllowlist,
)
from vllm_sidecar.proxy import SidecarConfig, SidecarProxy

log = logging.getLogger("vllm_sidecar")


class ConfigError(ValueError):
    """A flag combination that cannot work; the message names the flag."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = (
        "P/D sidecar: runs the prefill leg on the prefiller named by the EPP, then decodes locally."
    )
    g = p.add_argument_group("listening")
    g.add_argument("--host", default="0.0.0.0", help="listen address (default 0.0.0.0)")
    g.add_argument(
        "--port", type=int, default=8000, help="listen port = the pool's target port (8000)"
    )
    g.add_argument(
        "--metrics-port", type=int, default=9400, help="Prometheus /metrics port; 0 disables (9400)"
    )
    g.add_argument("--metrics-host", default=None, help="metrics listen address (default: --host)")
    g.add_argument("--cert-file", help="serve TLS with this certificate (PEM)")
    g.add_argument("--key-file", help="private key for --cert-file (PEM)")
    g.add_argument(
        "--secure-serving",
        action="store_true",
        help="serve TLS; with no --cert-file a self-signed certificate is generated at start",
    )
    g = p.add_argument_group("local vLLM (decode leg)")
    g.add_argument(
        "--model-server-host", default="127.0.0.1", help="local vLLM address (127.0.0.1)"
    )
    g.add_argument(
        "--model-server-port", "--vllm-port", type=int, default=8200, help="local vLLM port (8200)"
    )
    g.add_argument("--decoder-tls", action="store_true", help="talk HTTPS to the local vLLM")
    g.add_argument("--decoder-ca-file", help="CA bundle to verify the local vLLM's certificate")
    g.add_argument("--decoder-tls-insecure-skip-verify", action="store_true")
    g.add_argument(
        "--decode-read-timeout",
        type=float,
        default=600.0,
        help="max silence (s) on the decode leg (600)",
    )
    g = p.add_argument_group("prefill leg")
    g.add_argument("--prefiller-tls", action="store_true", help="talk HTTPS to prefillers")
    g.add_argument("--prefiller-ca-file", help="CA bundle to verify prefillers' certificates")
    g.add_argument("--prefiller-tls-insecure-skip-verify", action="store_true")
    g.add_argument(
        "--prefill-timeout",
        type=float,
        default=300.0,
        help="total seconds per prefill attempt (300)",
    )
    g.add_argument(
        "--connect-timeout", type=float, default=5.0, help="TCP connect timeout, both legs (5)"
    )
    g.add_argument(
        "--prefill-max-retries",
        type=int,
        default=2,
        help="retries on 502/503/504/connect errors (2)",
    )
    g.add_argument(
        "--prefill-retry-backoff",
        type=float,
        default=0.2,
        help="first retry delay in s, doubled each time (0.2)",
    )
    g.add_argument(
        "--on-prefill-failure",
        choices=("local", "error"),
        default="local",
        help="local: decode the request locally without remote KV (default); error: answer with the prefiller's error",
    )
    g = p.add_argument_group("SSRF protection (prefill targets must be pool members)")
    g.add_argument(
        "--endpoints-file",
        help="the pool's endpoint file (same YAML as `pdroute epp --endpoints-file`)",
    )
    g.add_argument(
        "--inference-pool",
        help="NAMESPACE/NAME of the InferencePool to take members from (Kubernetes)",
    )
    _add_kube_connection_arguments(g)
    g.add_argument(
        "--no-ssrf-protection",
        action="store_true",
        help="allow any prefill target (development only)",
    )
    g = p.add_argument_group("limits")
    g.add_argument(
        "--max-request-bytes",
        type=int,
        default=32 * 1024 * 1024,
        help="larger bodies get 413 (32 MiB)",
    )
    g.add_argument(
        "--max-connections",
        type=int,
        default=1024,
        help="upstream connection pool size per leg (1024)",
    )
    g.add_argument(
        "--allow-client-kv-transfer-params",
        action="store_true",
        help="keep kv_transfer_params sent by clients (default: removed; they steer NIXL)",
    )
    g.add_argument(
        "--shutdown-grace",
        type=float,
        default=30.0,
        help="seconds in-flight requests get at shutdown (30)",
    )
    g.add_argument("--log-level", default="INFO")


def _client_ssl(
    enabled: bool, ca_file: str | None, insecure: bool, flag: str
) -> ssl.SSLContext | bool | None:
    if not enabled:
        if ca_file or insecure:
            raise ConfigError(
                f"--{flag}-ca-file / --{flag}-tls-insecure-skip-verify need --{flag}-tls"
            )
        return None
    if insecure:
        return False
    if ca_file:
        try:
            return ssl.create_default_context(cafile=ca_file)
        except (OSError, ssl.SSLError) as e:
            raise ConfigError(f"--{flag}-ca-file {ca_file}: {e}") from None
    return None


def config_from_args(args: argparse.Namespace) -> SidecarConfig:
    if args.prefill_max_retries < 0:
        raise ConfigError("--prefill-max-retries must be >= 0")
    for name in ("prefill_timeout", "connect_timeout", "decode_read_timeout"):
        if getattr(args, name) <= 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be > 0")
    if args.max_request_bytes <= 0:
        raise ConfigError("--max-request-bytes must be > 0")
    scheme = "https" if args.decoder_tls else "http"
    return SidecarConfig(
        decoder_url=f"{scheme}://{args.model_server_host}:{args.model_server_port}",
        prefiller_scheme="https" if args.prefiller_tls else "http",
        prefiller_ssl=_client_ssl(
            args.prefiller_tls,
            args.prefiller_ca_file,
            args.prefiller_tls_insecure_skip_verify,
            "prefiller",
        ),
        decoder_ssl=_client_ssl(
            args.decoder_tls, args.decoder_ca_file, args.decoder_tls_insecure_skip_verify, "decoder"
        ),
        prefill_timeout_s=args.prefill_timeout,
        connect_timeout_s=args.connect_timeout,
        decode_read_timeout_s=args.decode_read_timeout,
        prefill_max_retries=args.prefill_max_retries,
        prefill_retry_backoff_s=args.prefill_retry_backoff,
        on_prefill_failure=args.on_prefill_failure,
        max_request_bytes=args.max_request_bytes,
        allow_client_kv_transfer_params=args.allow_client_kv_transfer_params,
        max_connections=args.max_connections,
    )


def allowlist_from_args(args: argparse.Namespace) -> Allowlist:
    chosen = [bool(args.endpoints_file), bool(args.inference_pool), bool(args.no_ssrf_protection)]
    if sum(chosen) > 1:
        raise ConfigError(
            "give only one of --endpoints-file, --inference-pool, --no-ssrf-protection"
        )
    if args.no_ssrf_protection:
        log.warning("SSRF protection is OFF: any x-prefiller-host-port target is accepted")
        return AllowAll()
    if args.endpoints_file:
        try:
            return StaticFileAllowlist(args.endpoints_file)
        except AllowlistError as e:
            raise ConfigError(f"--endpoints-file: {e}") from None
    if args.inference_pool:
        return _kube_allowlist(args)
    raise ConfigError(
        "SSRF protection needs the pool's members: pass --endpoints-file FILE or "
        "--inference-pool NAMESPACE/NAME (or --no-ssrf-protection for development)"
    )


def _add_kube_connection_arguments(g: Any) -> None:
    """The API-server connection flags every pdroute process shares (pdroute.kube.cli)."""
    try:
        from pdroute.kube.cli import add_connection_arguments
    except ImportError:  # older pdroute.kube: only the server URL
        g.add_argument("--kube-api-server", help="API server URL (default: in-cluster)")
    else:
        add_connection_arguments(g)


def _kube_allowlist(args: argparse.Namespace) -> Allowlist:
    pool: str = args.inference_pool
    ns, sep, name = pool.partition("/")
    if not sep or not ns or not name:
        raise ConfigError(f"--inference-pool must be NAMESPACE/NAME, got {pool!r}")
    try:
        from pdroute.kube import KubeClient, KubeConfig, KubeConfigError
        from pdroute.kube.members import PoolMembers
    except ImportError as e:  # pragma: no cover - the package ships with pdroute
        raise ConfigError(f"--inference-pool needs pdroute.kube: {e}") from None
    try:
        try:
            from pdroute.kube.cli import kube_config_from_args
        except ImportError:
            server = getattr(args, "kube_api_server", None)
            kcfg = KubeConfig(server=server, namespace=ns) if server else KubeConfig.in_cluster()
        else:
            kcfg = kube_config_from_args(args, ns)
    except KubeConfigError as e:
        raise ConfigError(f"--inference-pool: {e}") from None
    client = KubeClient(kcfg)
    members = PoolMembers(client, ns, pool_name=name)
    return MembersAllowlist(members.members, members.run)


def self_signed_context(common_name: str = "pdroute-sidecar") -> ssl.SSLContext:
    """A server context with a fresh self-signed certificate (``--secure-serving``)."""
    from pdroute.tlsutil import self_signed

    key_pem, cert_pem = self_signed(common_name)
    with tempfile.TemporaryDirectory(prefix="pdroute-sidecar-tls-") as d:
        cert_path, key_path = Path(d) / "tls.crt", Path(d) / "tls.key"
        cert_path.write_bytes(cert_pem)
        key_path.write_bytes(key_pem)
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(cert_path, key_path)
    return ctx


def server_ssl_from_args(args: argparse.Namespace) -> ssl.SSLContext | None:
    if bool(args.cert_file) != bool(args.key_file):
        raise ConfigError("--cert-file and --key-file go together")
    if args.cert_file:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            ctx.load_cert_chain(args.cert_file, args.key_file)
        except (OSError, ssl.SSLError) as e:
            raise ConfigError(f"--cert-file/--key-file: {e}") from None
        return ctx
    if args.secure_serving:
        return self_signed_context()
    return None


async def serve(
    proxy: SidecarProxy,
    *,
    host: str,
    port: int,
    metrics_host: str | None = None,
    metrics_port: int = 0,
    ssl_context: ssl.SSLContext | None = None,
    shutdown_grace_s: float = 30.0,
    stop: asyncio.Event | None = None,
    started: asyncio.Event | None = None,
) -> None:
    """Run until ``stop`` is set (or SIGTERM/SIGINT when ``stop`` is None)."""
    loop = asyncio.get_running_loop()
    installed: list[signal.Signals] = []
    if stop is None:
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(sig, stop.set)
                installed.append(sig)
    runner = web.AppRunner(proxy.build_app(), access_log=None, shutdown_timeout=shutdown_grace_s)
    await runner.setup()
    site = web.TCPSite(runner, host, port, ssl_context=ssl_context)
    await site.start()
    mrunner: web.AppRunner | None = None
    if metrics_port:
        mrunner = web.AppRunner(proxy.build_metrics_app(), access_log=None)
        await mrunner.setup()
        await web.TCPSite(mrunner, metrics_host or host, metrics_port).start()
    allow_task = asyncio.create_task(_run_allowlist(proxy.allowlist))
    log.info("sidecar listening on %s:%d -> %s", host, port, proxy.config.decoder_url)
    if started is not None:
        started.set()
    try:
        await stop.wait()
    finally:
        proxy.draining = True
        log.info("shutting down: draining in-flight requests (up to %.0fs)", shutdown_grace_s)
        await runner.cleanup()  # stops accepting, waits for handlers, closes sessions
        if mrunner is not None:
            await mrunner.cleanup()
        allow_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await allow_task
        for sig in installed:
            loop.remove_signal_handler(sig)


async def _run_allowlist(allowlist: Allowlist) -> None:
    try:
        await allowlist.run()
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("allowlist source stopped; keeping the last known members")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        config = config_from_args(args)
        allowlist = allowlist_from_args(args)
        ssl_context = server_ssl_from_args(args)
    except ConfigError as e:
        log.error("%s", e)
        return 2
    proxy = SidecarProxy(config, allowlist)
    runner: Any = asyncio.run
    with contextlib.suppress(ImportError):
        import uvloop

        runner = uvloop.run
    try:
        runner(
            serve(
                proxy,
                host=args.host,
                port=args.port,
                metrics_host=args.metrics_host,
                metrics_port=args.metrics_port,
                ssl_context=ssl_context,
                shutdown_grace_s=args.shutdown_grace,
            )
        )
    except OSError as e:
        log.error("cannot listen: %s", e)
        return 1
    return 0
