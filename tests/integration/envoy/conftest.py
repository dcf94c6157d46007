"""Fixtures: a real Envoy in front of the in-process EPP and tiny aiohttp backends.

Helpers live in ``envoy_stack.py`` (a uniquely named module: test files import it,
never ``conftest``, which is ambiguous across the suite).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from envoy_stack import PickDirector, Stack, start_backend  # type: ignore[import-not-found]

from epp.handlers import StreamHandler
from epp.server import EppServer, ServerOptions
from pdroute.stack.envoy import EnvoyOptions, EnvoyProcess
from tests.netutil import free_port


@pytest.fixture
def dead_endpoint() -> str:
    """A pool address with nothing listening (connection refused)."""
    return f"127.0.0.1:{free_port()}"


@pytest.fixture
async def make_stack(envoy_binary: str, tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    """``await make_stack(n_backends=3, failure_mode_allow=False, director=None, ...)``."""
    cleanups: list[Callable[[], Any]] = []

    async def make(
        n_backends: int = 3,
        *,
        failure_mode_allow: bool = False,
        director: Any = None,
        max_body: int = 1024 * 1024,
        extra_pool: list[str] | None = None,
        tls: bool = False,
        response_body: bool = False,
        response_headers: bool = True,
        mode: str = "pool",
        transport: str = "h2",
    ) -> Stack:
        backends = [await start_backend() for _ in range(n_backends)]
        for b in backends:
            cleanups.append(b.runner.cleanup)
        director = director or PickDirector(default=[backends[0].key])
        epp = EppServer(
            StreamHandler(director, max_request_body_bytes=max_body),
            ready=director.ready,
            options=ServerOptions(
                host="127.0.0.1",
                grpc_port=0,
                health_port=0,
                metrics_port=-1,
                secure_serving=tls,
                transport=transport,
            ),
        )
        await epp.start()
        cleanups.append(lambda: epp.stop(0))
        opts = EnvoyOptions(
            listen_port=free_port(),
            admin_port=free_port(),
            epp_port=epp.ports.grpc,
            pool=[b.key for b in backends] + list(extra_pool or []) if mode == "pool" else [],
            mode=mode,
            failure_mode_allow=failure_mode_allow,
            epp_tls=tls,
            response_body=response_body,
            response_headers=response_headers,
            message_timeout_s=5.0,
            epp_health_interval_s=0.2,
        )
        envoy = EnvoyProcess(
            opts,
            binary=envoy_binary,
            workdir=tmp_path / f"envoy{len(cleanups)}",
            log_level=os.environ.get("ENVOY_LOG", "warning"),
        )
        await asyncio.to_thread(envoy.start)
        await asyncio.to_thread(envoy.wait_epp_health, True)
        cleanups.append(lambda: asyncio.to_thread(envoy.stop))
        session = aiohttp.ClientSession()
        cleanups.append(session.close)
        return Stack(backends, director, epp, envoy, session)

    yield make
    for c in reversed(cleanups):
        res = c()
        if asyncio.iscoroutine(res):
            await res
