"""The P/D KV side channel: a decode server pulls a prefill server's blocks over TCP.

Stands in for NIXL (pull mode). The prefill server listens on its side-channel port
(``remote_host``/``remote_port`` in ``kv_transfer_params``). A pull is::

    D -> P   frame {"engine_id", "request_id", "block_ids"}
    P -> D   frame {"ok": true, "block_bytes": N, "num_blocks": K} + K*N raw bytes
             or frame {"ok": false, "error": "..."}
    D -> P   frame {"done": true}        (the "notification": P frees the lease)

With NIXL on both sides (:mod:`pdroute.sim.nixl_kv`) the request carries the decode
agent's metadata, P answers ``{"ok": true, ..., "nixl": {"metadata", "descs"}}``
instead of raw bytes, and D moves the bytes itself with a NIXL READ.

Frames are a 4-byte big-endian length and a msgpack map (bounded at 1 MiB). Block
contents are synthetic but deterministic: ``shake_256(key).digest(N)``, where key is
the vLLM block hash for full blocks and a hash of the tail tokens for the last
partial block; the decode side recomputes them from its own prompt, so a transfer
of the wrong blocks (or of corrupted bytes) is detected.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import msgspec

from pdroute.protocol.blockhash import HashFn, hash_block
from pdroute.sim.nixl_kv import NixlError, NixlKV

log = logging.getLogger(__name__)

MAX_FRAME = 1024 * 1024
_enc = msgspec.msgpack.Encoder()
_dec = msgspec.msgpack.Decoder(dict)


class TransferError(Exception):
    pass


def block_keys(
    prompt_ids: Sequence[int],
    full_hashes: Sequence[bytes],
    block_size: int,
    hash_fn: HashFn,
) -> list[bytes]:
    """One key per prompt block (``ceil(len/bs)``): full-block hashes, then the tail."""
    keys = list(full_hashes)
    tail = prompt_ids[len(full_hashes) * block_size :]
    if tail:
        parent = full_hashes[-1] if full_hashes else b"root"
        keys.append(hash_block(hash_fn, parent, tail, ("partial",)))
    return keys


def block_bytes(key: bytes, size: int) -> bytes:
    return hashlib.shake_256(key).digest(size) if size else b""


async def write_frame(writer: asyncio.StreamWriter, obj: object) -> None:
    data = _enc.encode(obj)
    writer.write(len(data).to_bytes(4, "big") + data)
    await writer.drain()


async def read_frame(reader: asyncio.StreamReader) -> dict[str, object]:
    n = int.from_bytes(await reader.readexactly(4), "big")
    if n > MAX_FRAME:
        raise TransferError(f"side-channel frame too large ({n} bytes)")
    return _dec.decode(await reader.readexactly(n))


@dataclass(frozen=True, slots=True)
class LeaseView:
    """What the side channel needs from a lease: keys of the blocks it covers."""

    block_ids: list[int]
    keys: list[bytes]


class SideChannelServer:
    """Prefill side: serves leased blocks to decode servers."""

    def __init__(
        self,
        *,
        engine_id: str,
        block_bytes_size: int,
        get_lease: Callable[[str], LeaseView | None],
        release: Callable[[str], object],
        nixl: NixlKV | None = None,
    ) -> None:
        self.nixl = nixl
        self.engine_id = engine_id
        self.block_bytes_size = block_bytes_size
        self._get_lease = get_lease
        self._release = release
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self, host: str, port: int) -> int:
        self._server = await asyncio.start_server(self._handle, host, port)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self.port

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            req = await read_frame(reader)
            if req.get("engine_id") != self.engine_id:
                await write_frame(writer, {"ok": False, "error": "remote_engine_id mismatch"})
                return
            rid = str(req.get("request_id"))
            lease = self._get_lease(rid)
            wanted = req.get("block_ids")
            if lease is None:
                await write_frame(
                    writer, {"ok": False, "error": f"no KV lease for {rid} (expired?)"}
                )
                return
            if wanted != lease.block_ids[: len(lease.keys)]:
                await write_frame(writer, {"ok": False, "error": "remote_block_ids do not match"})
                return
            size = self.block_bytes_size
            head: dict[str, object] = {
                "ok": True,
                "block_bytes": size,
                "num_blocks": len(lease.keys),
            }
            peer = req.get("nixl")
            if self.nixl is not None and isinstance(peer, dict) and size:
                try:
                    self.nixl.add_remote(bytes(peer["metadata"]))
                    descs = self.nixl.expose(
                        lease.block_ids[: len(lease.keys)],
                        [block_bytes(k, size) for k in lease.keys],
                    )
                except Exception as e:  # NIXL raises its own (C++) error types
                    await write_frame(writer, {"ok": False, "error": f"NIXL setup failed: {e}"})
                    return
                head["nixl"] = {"metadata": self.nixl.metadata, "descs": descs}
                await write_frame(writer, head)
            else:
                await write_frame(writer, head)
                for key in lease.keys:
                    writer.write(block_bytes(key, size))
                await writer.drain()
            done = await read_frame(reader)
            if done.get("done"):
                self._release(rid)
        except (asyncio.IncompleteReadError, ConnectionError, TransferError, msgspec.DecodeError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


async def pull_blocks(
    *,
    host: str,
    port: int,
    engine_id: str,
    request_id: str,
    block_ids: list[int],
    expected_keys: list[bytes],
    deadline_s: float,
    nixl: NixlKV | None = None,
    local_block_ids: list[int] | None = None,
    timings: dict[str, float] | None = None,
) -> int:
    """Pull and verify blocks; returns bytes received. Raises :class:`TransferError`.

    Connection attempts are retried until ``deadline_s`` (vLLM's NIXL handshake gives up
    after a few seconds and fails the request).
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + deadline_s
    last: Exception | None = None
    while True:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(host, port), max(0.01, deadline - loop.time())
            )
            break
        except (OSError, TimeoutError) as e:
            last = e
            if loop.time() >= deadline:
                raise TransferError(f"handshake_failed with {host}:{port}: {last}") from None
            await asyncio.sleep(min(0.1, max(0.0, deadline - loop.time())))
    try:
        async with asyncio.timeout(max(0.01, deadline - loop.time() + deadline_s)):
            ask: dict[str, object] = {
                "engine_id": engine_id,
                "request_id": request_id,
                "block_ids": block_ids,
            }
            if nixl is not None and local_block_ids is not None:
                ask["nixl"] = {"metadata": nixl.metadata}
            await write_frame(writer, ask)
            head = await read_frame(reader)
            if not head.get("ok"):
                raise TransferError(f"KV transfer refused by {host}:{port}: {head.get('error')}")
            size = head.get("block_bytes")
            count = head.get("num_blocks")
            if not isinstance(size, int) or not isinstance(count, int):
                raise TransferError("malformed side-channel header")
            if count != len(expected_keys):
                raise TransferError(f"expected {len(expected_keys)} blocks, source has {count}")
            remote = head.get("nixl")
            if isinstance(remote, dict) and nixl is not None and local_block_ids is not None:
                dst = local_block_ids[:count]
                post = await nixl.read(
                    bytes(remote["metadata"]),
                    bytes(remote["descs"]),
                    dst,
                    max(0.01, deadline - loop.time() + deadline_s),
                )
                if timings is not None:
                    timings["post"] = post
                    timings["nixl"] = 1.0
                for i, (b, key) in enumerate(zip(dst, expected_keys, strict=True)):
                    if nixl.block(b) != block_bytes(key, size):
                        raise TransferError(f"KV block {i} content mismatch (NIXL)")
            else:
                for i, key in enumerate(expected_keys):
                    data = await reader.readexactly(size)
                    if data != block_bytes(key, size):
                        raise TransferError(f"KV block {i} content mismatch")
            await write_frame(writer, {"done": True})
            return size * count
    except (asyncio.IncompleteReadError, ConnectionError, TimeoutError, NixlError) as e:
        raise TransferError(f"KV transfer from {host}:{port} failed: {e!r}") from None
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
