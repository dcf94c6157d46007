"""Many simulated servers in one process (the Python API behind ``pdroute sim``).

Usage (inside a running event loop)::

    fleet = SimFleet(SimConfig(model="m", profile=get_profile("fast")), replicas=16)
    await fleet.start()          # binds HTTP ports (config.port + i, or ephemeral)
    fleet.ports                  # [p0, p1, ...]
    fleet.addresses              # ["127.0.0.1:p0", ...]
    fleet.side_channel_ports     # P/D side channel of each replica (None if role decode/none)
    fleet.kv_event_endpoints     # endpoint each replica publishes KV events on (or None)
    await fleet.stop()

Replicas share the event loop; each has its own engine, KV cache, metrics, KV-event
publisher and side channel. ``SimFleet`` is also an async context manager.
"""

from __future__ import annotations

import asyncio
from types import TracebackType

from pdroute.sim.config import SimConfig
from pdroute.sim.server import SimServer


class SimFleet:
    def __init__(self, config: SimConfig, replicas: int = 1) -> None:
        if replicas < 1:
            raise ValueError("replicas must be >= 1")
        config.validate()
        self.config = config
        self.servers = [SimServer(config, rank=i) for i in range(replicas)]
        self._started = False

    async def start(self) -> None:
        started: list[SimServer] = []
        try:
            for s in self.servers:
                await s.start()
                started.append(s)
        except BaseException:
            await asyncio.gather(*(s.stop() for s in started), return_exceptions=True)
            raise
        self._started = True

    async def stop(self) -> None:
        if self._started:
            await asyncio.gather(*(s.stop() for s in self.servers), return_exceptions=True)
            self._started = False

    async def __aenter__(self) -> SimFleet:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    @property
    def ports(self) -> list[int]:
        return [s.port for s in self.servers]

    @property
    def addresses(self) -> list[str]:
        return [s.address for s in self.servers]

    @property
    def side_channel_ports(self) -> list[int | None]:
        return [s.side.port if s.side else None for s in self.servers]

    @property
    def kv_event_endpoints(self) -> list[str | None]:
        return [
            (s.publisher.bound_endpoint or s.publisher.endpoint) if s.publisher else None
            for s in self.servers
        ]
