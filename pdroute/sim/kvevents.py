"""KV-cache events over ZMQ, on vLLM's wire (``vllm/distributed/kv_events.py``).

- PUB socket; like vLLM's ``ZmqEventPublisher`` it *binds* when the endpoint contains
  ``*`` or ``::`` or is ``ipc://``/``inproc://``, and otherwise *connects* to a
  binding subscriber ("bind stable, connect volatile").
- Each message has 3 frames: topic, 8-byte big-endian sequence number, msgpack
  ``[ts, [events...], dp_rank]`` (encoded by :mod:`pdroute.protocol.kv_events`).
- Optional replay: a ROUTER socket (always bound) answers ``[b"", start_seq(8B)]``
  with every buffered ``[b"", seq, payload]`` whose ``seq >= start_seq``, then
  ``[b"", END_SEQ, b""]`` where ``END_SEQ`` is -1 as signed 8 bytes. The replay
  buffer holds the last ``buffer_steps`` messages (bounded).

Sending is non-blocking on the event loop: a PUB socket never blocks; at the
high-water mark ZMQ drops, which subscribers see as a sequence gap (as with vLLM).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence

import zmq
import zmq.asyncio

from pdroute.protocol.kv_events import EventBatch, KVEvent, encode_payload, encode_seq

log = logging.getLogger(__name__)

END_SEQ = (-1).to_bytes(8, "big", signed=True)


def should_bind(endpoint: str) -> bool:
    """vLLM's rule: bind wildcard and ipc/inproc endpoints, connect to the rest."""
    return (
        "*" in endpoint
        or "::" in endpoint
        or endpoint.startswith("ipc://")
        or endpoint.startswith("inproc://")
    )


class KVEventPublisher:
    def __init__(
        self,
        endpoint: str,
        topic: str,
        *,
        replay_endpoint: str | None = None,
        buffer_steps: int = 10_000,
        data_parallel_rank: int = 0,
        hwm: int = 100_000,
        wall: Callable[[], float] = time.time,
        context: zmq.asyncio.Context | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.topic = topic.encode("utf-8")
        self.replay_endpoint = replay_endpoint
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=buffer_steps)
        self._rank = data_parallel_rank
        self._wall = wall
        self._ctx = context or zmq.asyncio.Context.instance()
        self._pub = self._ctx.socket(zmq.PUB)
        self._pub.setsockopt(zmq.SNDHWM, hwm)
        self._pub.setsockopt(zmq.LINGER, 0)
        self._replay: zmq.asyncio.Socket | None = None
        self._replay_task: asyncio.Task[None] | None = None
        self._seq = 0
        self.dropped = 0
        self.bound_endpoint: str | None = None
        self.bound_replay_endpoint: str | None = None

    def start(self) -> None:
        if should_bind(self.endpoint):
            self._pub.bind(self.endpoint)
            self.bound_endpoint = self._pub.getsockopt_string(zmq.LAST_ENDPOINT)
        else:
            self._pub.connect(self.endpoint)
        if self.replay_endpoint:
            self._replay = self._ctx.socket(zmq.ROUTER)
            self._replay.setsockopt(zmq.LINGER, 0)
            self._replay.bind(self.replay_endpoint)
            self.bound_replay_endpoint = self._replay.getsockopt_string(zmq.LAST_ENDPOINT)
            self._replay_task = asyncio.get_running_loop().create_task(self._serve_replay())

    def publish(self, events: Sequence[KVEvent]) -> int:
        """Send one batch; returns its sequence number."""
        seq = self._seq
        self._seq += 1
        payload = encode_payload(
            EventBatch(ts=self._wall(), events=list(events), data_parallel_rank=self._rank)
        )
        self._buffer.append((seq, payload))
        try:
            # zmq.asyncio sockets return a future; a PUB send with NOBLOCK completes at once.
            self._pub.send_multipart([self.topic, encode_seq(seq), payload], flags=zmq.NOBLOCK)
        except zmq.Again:
            self.dropped += 1
        return seq

    async def _serve_replay(self) -> None:
        sock = self._replay
        assert sock is not None
        while True:
            try:
                frames = await sock.recv_multipart()
            except (asyncio.CancelledError, zmq.ZMQError):
                return
            if len(frames) < 3 or len(frames[-1]) != 8:
                continue  # malformed request: ignore, like vLLM's publisher logs and skips
            ident = frames[0]
            start = int.from_bytes(frames[-1], "big")
            for seq, payload in list(self._buffer):
                if seq >= start:
                    await sock.send_multipart([ident, b"", encode_seq(seq), payload])
            await sock.send_multipart([ident, b"", END_SEQ, b""])

    async def close(self) -> None:
        if self._replay_task is not None:
            self._replay_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._replay_task
        if self._replay is not None:
            self._replay.close(0)
        self._pub.close(0)
