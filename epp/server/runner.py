"""The EPP's servers, started and stopped together.

* ext_proc gRPC on ``grpc_port`` (9002), optionally TLS (:mod:`epp.server.tls`);
* gRPC health on ``health_port`` (9003), services ``liveness`` (always SERVING
  while the process runs), ``readiness``, ``""`` and
  ``envoy.service.ext_proc.v3.ExternalProcessor`` (SERVING iff the director is
  ready: the datastore synced). The ext_proc port serves the same health service,
  so an Envoy gRPC health check on the ext_proc cluster works too;
* Prometheus on ``metrics_port`` (9090).

Two transports serve the gRPC ports: ``h2`` (default), the EPP's own HTTP/2 server
on the event loop (:mod:`epp.server.h2grpc`, several times cheaper per request),
and ``grpcio`` (grpc.aio). Both serve the same handler and the same health
state (:class:`epp.server.health.HealthState`).

Ports may be 0 (tests): the bound ports are in :attr:`EppServer.ports` after
:meth:`start`. :meth:`stop` enters graceful shutdown: health turns NOT_SERVING (for
``drain_notice_s`` streams are still accepted, so Envoy's health check can move
away first), then new streams are refused and in-flight ones get ``grace_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from aiohttp import web
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio  # type: ignore[attr-defined]

from epp.handlers import StreamHandler
from epp.server import extproc, h2grpc
from epp.server.health import HealthState
from epp.server.health import register as register_health
from epp.server.observability import PoolGauges, start_metrics_server
from epp.server.tls import server_credentials, server_ssl_context

log = logging.getLogger(__name__)

LIVENESS = "liveness"
READINESS = "readiness"
_READY_SERVICES = ("", READINESS, extproc.SERVICE_NAME)
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
TRANSPORTS = ("h2", "grpcio")


@dataclass
class ServerOptions:
    host: str = "0.0.0.0"
    grpc_port: int = 9002
    health_port: int = 9003
    metrics_port: int = 9090  # < 0 disables the metrics server
    #: ``h2`` (the EPP's own HTTP/2 server) or ``grpcio`` (grpc.aio).
    transport: str = "h2"
    #: TLS on the gRPC ports: a self-signed certificate, or ``cert_path``'s
    #: ``tls.crt``/``tls.key`` reloaded when they change (:mod:`epp.server.tls`).
    secure_serving: bool = False
    cert_path: Path | None = None
    max_receive_bytes: int = 17 * 1024 * 1024
    readiness_interval_s: float = 0.5
    gauge_interval_s: float = 1.0
    grace_s: float = 10.0
    #: On stop, how long health reports NOT_SERVING while streams are still accepted,
    #: so health-checking proxies move away before new streams would be refused.
    drain_notice_s: float = 0.0


@dataclass
class Ports:
    grpc: int = 0
    health: int = 0
    metrics: int = 0


@dataclass
class EppServer:
    handler: StreamHandler
    ready: Callable[[], bool]
    options: ServerOptions = field(default_factory=ServerOptions)
    gauges: PoolGauges | None = None
    ports: Ports = field(default_factory=Ports)

    def __post_init__(self) -> None:
        """Raises ValueError for a bad transport or an unreadable ``cert_path``."""
        o = self.options
        if o.transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {TRANSPORTS}")
        self._credentials: Callable[[], grpc.ServerCredentials] | None = None
        self._ssl_context: Callable[[], ssl.SSLContext] | None = None
        if o.secure_serving and o.transport == "grpcio":
            self._credentials = server_credentials(o.cert_path)
        elif o.secure_serving:
            self._ssl_context = server_ssl_context(o.cert_path)
        self._servers: list[grpc.aio.Server] = []
        self._h2_servers: list[h2grpc.GrpcServer] = []
        self._health = health_aio.HealthServicer()
        self.health = HealthState()
        self._tasks: list[asyncio.Task[None]] = []
        self._metrics_runner: web.AppRunner | None = None
        self._last_ready: bool | None = None

    def _grpc_server(self) -> grpc.aio.Server:
        o = self.options
        return grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", o.max_receive_bytes),
                ("grpc.max_send_message_length", o.max_receive_bytes),
                ("grpc.max_concurrent_streams", 100_000),
                ("grpc.so_reuseport", 0),
            ]
        )

    def _bind(self, server: grpc.aio.Server, port: int) -> int:
        addr = f"{self.options.host}:{port}"
        creds = self._credentials
        bound = (
            server.add_secure_port(addr, creds())
            if creds is not None
            else server.add_insecure_port(addr)
        )
        if bound == 0:
            raise OSError(f"cannot listen on {addr}")
        return bound

    async def _set_health(self, service: str, status: int) -> None:
        self.health.set(service, status)
        if self.options.transport == "grpcio":
            await self._health.set(service, status)

    async def _start_h2(self) -> None:
        o = self.options
        make_ctx = self._ssl_context
        handler = self.handler

        async def process(stream: h2grpc.ServerStream) -> None:
            await handler.run(stream.read, stream.write, h2grpc.EOF)

        main = h2grpc.GrpcServer(max_message_bytes=o.max_receive_bytes)
        main.add_method(extproc.PROCESS_PATH, extproc.parse_request, process)
        register_health(main, self.health)
        health = h2grpc.GrpcServer(max_message_bytes=64 * 1024)
        register_health(health, self.health)
        self._h2_servers = [main, health]
        self.ports.grpc = await main.listen(
            o.host, o.grpc_port, make_ctx() if make_ctx is not None else None
        )
        self.ports.health = await health.listen(
            o.host, o.health_port, make_ctx() if make_ctx is not None else None
        )

    async def start(self) -> None:
        o = self.options
        await self._set_health(LIVENESS, _SERVING)
        await self._update_readiness()
        if o.transport == "h2":
            await self._start_h2()
        else:
            await self._start_grpcio()
        if o.metrics_port >= 0:
            runner = await start_metrics_server(o.host, o.metrics_port)
            self._metrics_runner = runner
            if runner.addresses:
                self.ports.metrics = int(runner.addresses[0][1])
        self._tasks.append(asyncio.create_task(self._readiness_loop()))
        if self.gauges is not None:
            self._tasks.append(asyncio.create_task(self.gauges.run(o.gauge_interval_s)))
        log.info(
            "EPP serving (%s): ext_proc %s:%d (%s), health %d, metrics %d",
            o.transport,
            o.host,
            self.ports.grpc,
            "TLS" if o.secure_serving else "plaintext",
            self.ports.health,
            self.ports.metrics,
        )

    async def _start_grpcio(self) -> None:
        o = self.options
        main = self._grpc_server()
        extproc.add_to_server(self.handler, main)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, main)
        self.ports.grpc = self._bind(main, o.grpc_port)
        health = self._grpc_server()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, health)
        self.ports.health = self._bind(health, o.health_port)
        self._servers = [main, health]
        for s in self._servers:
            await s.start()

    async def _update_readiness(self) -> None:
        try:
            ready = bool(self.ready())
        except Exception:
            log.exception("readiness check failed")
            ready = False
        if ready != self._last_ready:
            self._last_ready = ready
            for svc in _READY_SERVICES:
                await self._set_health(svc, _SERVING if ready else _NOT_SERVING)
            log.info("readiness: %s", "SERVING" if ready else "NOT_SERVING")

    async def _readiness_loop(self) -> None:
        while True:
            await asyncio.sleep(self.options.readiness_interval_s)
            await self._update_readiness()

    async def wait(self) -> None:
        if self._h2_servers:
            await self._h2_servers[0].wait_closed()
        elif self._servers:
            await self._servers[0].wait_for_termination()

    async def stop(self, grace_s: float | None = None) -> None:
        grace = self.options.grace_s if grace_s is None else grace_s
        self.health.enter_graceful_shutdown()
        await self._health.enter_graceful_shutdown()
        if self.options.drain_notice_s > 0 and grace > 0:
            await asyncio.sleep(min(self.options.drain_notice_s, grace))
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._tasks = []
        await asyncio.gather(*(s.stop(grace) for s in self._servers))
        await asyncio.gather(*(s.stop(grace) for s in self._h2_servers))
        self._servers = []
        self._h2_servers = []
        runner = self._metrics_runner
        if runner is not None:
            await runner.cleanup()
            self._metrics_runner = None
