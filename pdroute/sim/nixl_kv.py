"""Real NIXL data plane for the P/D side channel (used when ``nixl`` is importable).

Each server that uses NIXL owns one agent (named by its engine id) and one DRAM
buffer of ``num_blocks * block_bytes`` registered with the UCX backend: the
simulated "KV memory", block ``i`` at offset ``i * block_bytes``. The TCP side
channel (:mod:`pdroute.sim.transfer`) stays the control plane (agent metadata and
serialized block descriptors travel in its frames, like vLLM's NIXL handshake);
the bytes themselves move with a NIXL ``READ`` initiated by the decode side, as
NixlConnector does in pull mode.

The prefill side writes each leased block's synthetic content into its slot when
the pull is requested (lazily, instead of during prefill: nothing observable
differs). No NIXL notification is used: completion is reported over the side
channel, because a notification only completes while the target polls for it.
All NIXL calls are short and non-blocking except agent setup; transfers are
polled from the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import importlib
from collections.abc import Sequence
from typing import Any


def nixl_available() -> bool:
    try:
        importlib.import_module("nixl._api")
    except Exception:
        return False
    return True


class NixlError(Exception):
    pass


class NixlKV:
    def __init__(self, name: str, num_blocks: int, block_bytes: int) -> None:
        api = importlib.import_module("nixl._api")
        self.name = name
        self.block_bytes = block_bytes
        size = max(1, num_blocks * block_bytes)
        self._agent: Any = api.nixl_agent(name, api.nixl_agent_config(backends=["UCX"]))
        self._buf = bytearray(size)
        self._addr = ctypes.addressof((ctypes.c_char * size).from_buffer(self._buf))
        self._reg = self._agent.register_memory([(self._addr, size, 0, "")], mem_type="DRAM")
        self.metadata: bytes = self._agent.get_agent_metadata()
        self._remotes: set[str] = set()

    def _descs(self, block_ids: Sequence[int]) -> Any:
        bb = self.block_bytes
        return self._agent.get_xfer_descs([(self._addr + b * bb, bb, 0) for b in block_ids], "DRAM")

    def add_remote(self, metadata: bytes) -> str:
        name: str = self._agent.add_remote_agent(metadata)
        self._remotes.add(name)
        return name

    def expose(self, block_ids: Sequence[int], contents: Sequence[bytes]) -> bytes:
        """Write ``contents[i]`` into block ``block_ids[i]``; return serialized descriptors."""
        bb = self.block_bytes
        for b, data in zip(block_ids, contents, strict=True):
            self._buf[b * bb : (b + 1) * bb] = data
        ser: bytes = self._agent.get_serialized_descs(self._descs(block_ids))
        return ser

    def block(self, block_id: int) -> bytes:
        bb = self.block_bytes
        return bytes(self._buf[block_id * bb : (block_id + 1) * bb])

    async def read(
        self,
        remote_metadata: bytes,
        remote_descs: bytes,
        local_block_ids: Sequence[int],
        deadline_s: float,
    ) -> float:
        """READ remote blocks into ``local_block_ids``; returns the post time (seconds)."""
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        remote = self.add_remote(remote_metadata)
        rdescs = self._agent.deserialize_descs(remote_descs)
        handle = self._agent.initialize_xfer("READ", self._descs(local_block_ids), rdescs, remote)
        state = self._agent.transfer(handle)
        post = loop.time() - t0
        try:
            end = t0 + deadline_s
            while state not in ("DONE", "ERR"):
                if loop.time() > end:
                    raise NixlError("NIXL READ timed out")
                await asyncio.sleep(0.0005)
                state = self._agent.check_xfer_state(handle)
            if state == "ERR":
                raise NixlError("NIXL READ failed")
        finally:
            self._agent.release_xfer_handle(handle)
        return post

    def close(self) -> None:
        for r in self._remotes:
            with contextlib.suppress(Exception):  # best effort at shutdown
                self._agent.remove_remote_agent(r)
        self._remotes.clear()
        with contextlib.suppress(Exception):
            self._agent.deregister_memory(self._reg)
