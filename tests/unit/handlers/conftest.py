"""In-process grpc.aio ext_proc server (the real servicer) around a fake director."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from extproc_fakes import FakeDirector, Harness  # type: ignore[import-not-found]

from epp.handlers import StreamHandler
from epp.server import extproc


@pytest.fixture
async def make_harness() -> AsyncIterator[Callable[..., Any]]:
    servers: list[grpc.aio.Server] = []
    channels: list[grpc.aio.Channel] = []

    async def make(director: FakeDirector | None = None, **handler_kw: Any) -> Harness:
        director = director or FakeDirector()
        handler = StreamHandler(director, **handler_kw)
        server = grpc.aio.server()
        extproc.add_to_server(handler, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        servers.append(server)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        channels.append(channel)
        return Harness(director, handler, pb_grpc.ExternalProcessorStub(channel))

    yield make
    for c in channels:
        await c.close(None)
    for s in servers:
        await s.stop(0)
