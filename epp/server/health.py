"""gRPC health (``grpc.health.v1.Health``) for the EPP's own HTTP/2 server.

:class:`HealthState` holds the status of each service name; :func:`register`
serves ``Check`` (unary: the status, or ``NOT_FOUND`` for an unknown service, as
the gRPC health protocol says) and ``Watch`` (server streaming: the status now,
then each change; ``SERVICE_UNKNOWN`` while the name is unknown) on a
:class:`epp.server.h2grpc.GrpcServer`. Envoy's gRPC health check, Kubernetes'
``grpc`` probes and ``grpc_health_probe`` all use ``Check``.
"""

from __future__ import annotations

import asyncio

from grpc_health.v1 import health_pb2

from epp.server import h2grpc

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN

CHECK_PATH = "/grpc.health.v1.Health/Check"
WATCH_PATH = "/grpc.health.v1.Health/Watch"


class HealthState:
    """Service name -> status. Invariant: ``changed`` is set (and replaced by a
    fresh event) on every change, so a watcher that waits on the event it read
    before sending a status never misses the next change."""

    def __init__(self) -> None:
        self._status: dict[str, int] = {}
        self.changed = asyncio.Event()
        self.shutting_down = False

    def get(self, service: str) -> int | None:
        return self._status.get(service)

    def set(self, service: str, status: int) -> None:
        if self.shutting_down:
            status = NOT_SERVING
        if self._status.get(service) == status:
            return
        self._status[service] = status
        self._notify()

    def enter_graceful_shutdown(self) -> None:
        """Every service reports NOT_SERVING from now on."""
        self.shutting_down = True
        for name in self._status:
            self._status[name] = NOT_SERVING
        self._notify()

    def _notify(self) -> None:
        old = self.changed
        self.changed = asyncio.Event()
        old.set()


def register(server: h2grpc.GrpcServer, state: HealthState) -> None:
    parse = health_pb2.HealthCheckRequest.FromString

    async def check(stream: h2grpc.ServerStream) -> None:
        req = await stream.read()
        if req is h2grpc.EOF:
            raise h2grpc.GrpcAbort(h2grpc.INVALID_ARGUMENT, "missing request")
        status = state.get(req.service)
        if status is None:
            raise h2grpc.GrpcAbort(h2grpc.NOT_FOUND, f"unknown service {req.service!r}")
        await stream.write(health_pb2.HealthCheckResponse(status=status))  # type: ignore[arg-type]

    async def watch(stream: h2grpc.ServerStream) -> None:
        req = await stream.read()
        if req is h2grpc.EOF:
            raise h2grpc.GrpcAbort(h2grpc.INVALID_ARGUMENT, "missing request")
        last: int | None = -1
        while True:
            changed = state.changed
            status = state.get(req.service)
            if status is None:
                status = SERVICE_UNKNOWN
            if status != last:
                await stream.write(health_pb2.HealthCheckResponse(status=status))  # type: ignore[arg-type]
                last = status
            await changed.wait()

    server.add_method(CHECK_PATH, parse, check)
    server.add_method(WATCH_PATH, parse, watch)
