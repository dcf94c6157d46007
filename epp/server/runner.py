"""The EPP's servers, started and stopped together.

* ext_proc gRPC on ``grpc_port`` (9002), optionally TLS (:mod:`epp.server.tls`);
* gRPC health on ``health_port`` (9003), services ``liveness`` (always SERVING
  while the process runs), ``readiness``, ``""`` and
  ``envoy.service.ext_proc.v3.ExternalProcessor`` (SERVING iff the director is
  ready: the datastore synced). The ext_proc port serves the same health service,
  so an Envoy gRPC health check on the ext_proc cluster works too;
* Prometheus on ``metrics_port`` (9090).

Ports may be 0 (tests): the bound ports are in :attr:`EppServer.ports` after
:meth:`start`. :meth:`stop` enters graceful shutdown: health turns NOT_SERVING (for
``drain_notice_s`` streams are still accepted, so Envoy's health check can move
away first), then new streams are refused and in-flight ones get ``grace_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
from aiohttp import web
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio  # type: ignore[attr-defined]

from epp.handlers import StreamHandler
from epp.server import extproc
from epp.server.observability import PoolGauges, start_metrics_server

log = logging.getLogger(__name__)

LIVENESS = "liveness"
READINESS = "readiness"
_READY_SERVICES = ("", READINESS, extproc.SERVICE_NAME)
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass
class ServerOptions:
    host: str = "0.0.0.0"
    grpc_port: int = 9002
    health_port: int = 9003
    metrics_port: int = 9090  # < 0 disables the metrics server
    #: Factory of TLS credentials (one per bound port), None for plaintext.
    credentials: Callable[[], grpc.ServerCredentials] | None = None
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
        self._servers: list[grpc.aio.Server] = []
        self._health = health_aio.HealthServicer()
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
        creds = self.options.credentials
        bound = (
            server.add_secure_port(addr, creds())
            if creds is not None
            else server.add_insecure_port(addr)
        )
        if bound == 0:
            raise OSError(f"cannot listen on {addr}")
        return bound

    async def start(self) -> None:
        o = self.options
        await self._health.set(LIVENESS, _SERVING)
        await self._update_readiness()
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
        if o.metrics_port >= 0:
            runner = await start_metrics_server(o.host, o.metrics_port)
            self._metrics_runner = runner
            if runner.addresses:
                self.ports.metrics = int(runner.addresses[0][1])
        self._tasks.append(asyncio.create_task(self._readiness_loop()))
        if self.gauges is not None:
            self._tasks.append(asyncio.create_task(self.gauges.run(o.gauge_interval_s)))
        log.info(
            "EPP serving: ext_proc %s:%d (%s), health %d, metrics %d",
            o.host,
            self.ports.grpc,
            "TLS" if o.credentials is not None else "plaintext",
            self.ports.health,
            self.ports.metrics,
        )

    async def _update_readiness(self) -> None:
        try:
            ready = bool(self.ready())
        except Exception:
            log.exception("readiness check failed")
            ready = False
        if ready != self._last_ready:
            self._last_ready = ready
            for svc in _READY_SERVICES:
                await self._health.set(svc, _SERVING if ready else _NOT_SERVING)
            log.info("readiness: %s", "SERVING" if ready else "NOT_SERVING")

    async def _readiness_loop(self) -> None:
        while True:
            await asyncio.sleep(self.options.readiness_interval_s)
            await self._update_readiness()

    async def wait(self) -> None:
        if self._servers:
            await self._servers[0].wait_for_termination()

    async def stop(self, grace_s: float | None = None) -> None:
        grace = self.options.grace_s if grace_s is None else grace_s
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
        self._servers = []
        runner = self._metrics_runner
        if runner is not None:
            await runner.cleanup()
            self._metrics_runner = None
