"""KV-event subscriber over real ZMQ sockets, against a publisher that behaves like
vLLM's ``ZmqEventPublisher`` (PUB + replay ROUTER + in-memory buffer)."""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import zmq
import zmq.asyncio

from epp.datalayer.kvevents import (
    KVEventIngestor,
    KVEventSubscriber,
    SubscriberConfig,
    TopicResolver,
    fetch_replay,
)
from epp.index.kvblock import KVBlockIndex
from pdroute.protocol.kv_events import (
    BlockRemoved,
    BlockStored,
    EventBatch,
    encode_payload,
    encode_seq,
)

END = (-1).to_bytes(8, "big", signed=True)


class VllmLikePublisher:
    """PUB socket (bind for wildcard/ipc, else connect, as vLLM does) with a replay
    ROUTER answering ``[id, b"", start_seq]`` with ``[id, b"", seq, payload]`` * n and
    an end marker ``[id, b"", -1, b""]``."""

    def __init__(
        self,
        ctx: zmq.asyncio.Context,
        topic: str,
        *,
        connect_to: str | None = None,
        bind_port: int | None = None,
    ):
        self.ctx = ctx
        self.topic = topic.encode()
        self.pub = ctx.socket(zmq.PUB)
        self.pub.setsockopt(zmq.LINGER, 0)
        if connect_to:
            self.pub.connect(connect_to)
            self.address = connect_to
        elif bind_port:
            self.address = f"tcp://127.0.0.1:{bind_port}"
            self.pub.bind(self.address)
        else:
            port = self.pub.bind_to_random_port("tcp://127.0.0.1")
            self.address = f"tcp://127.0.0.1:{port}"
        self.router = ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        rport = self.router.bind_to_random_port("tcp://127.0.0.1")
        self.replay_address = f"tcp://127.0.0.1:{rport}"
        self.buffer: deque[tuple[int, bytes]] = deque(maxlen=10_000)
        self.seq = 0
        self.replay_requests: list[int] = []
        self._task = asyncio.get_running_loop().create_task(self._serve_replay())

    async def publish(self, *events: BlockStored | BlockRemoved, drop: bool = False) -> int:
        """Publish one batch; ``drop`` keeps it only in the replay buffer (a loss)."""
        seq = self.seq
        self.seq += 1
        payload = encode_payload(EventBatch(ts=1.0, events=list(events), data_parallel_rank=0))
        self.buffer.append((seq, payload))
        if not drop:
            await self.pub.send_multipart([self.topic, encode_seq(seq), payload])
        return seq

    async def send_raw(self, frames: list[bytes]) -> None:
        await self.pub.send_multipart(frames)

    async def _serve_replay(self) -> None:
        while True:
            ident, _, start_b = await self.router.recv_multipart()
            start = int.from_bytes(start_b, "big")
            self.replay_requests.append(start)
            for seq, payload in list(self.buffer):
                if seq >= start:
                    await self.router.send_multipart([ident, b"", encode_seq(seq), payload])
            await self.router.send_multipart([ident, b"", END, b""])

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self.pub.close(linger=0)
        self.router.close(linger=0)


def stored(*hashes: int) -> BlockStored:
    return BlockStored(
        block_hashes=list(hashes), parent_block_hash=None, token_ids=[1] * 16, block_size=16
    )


async def eventually(cond: Callable[[], bool], limit_s: float = 5.0) -> None:
    async with asyncio.timeout(limit_s):
        while not cond():  # noqa: ASYNC110 - polling a plain predicate
            await asyncio.sleep(0.01)


async def until_joined(
    pub: VllmLikePublisher, index: KVBlockIndex, endpoint: str, marker: int = 10**15
) -> None:
    """PUB/SUB drops messages until the subscription propagates; keep publishing a
    marker block until the index has it."""
    async with asyncio.timeout(5):
        while index.held_count(endpoint) == 0 or not index.holders(marker):
            await pub.publish(stored(marker))
            await asyncio.sleep(0.02)


@pytest.fixture
async def ctx() -> AsyncIterator[zmq.asyncio.Context]:
    c = zmq.asyncio.Context()
    yield c
    c.destroy(linger=0)


Setup = Callable[..., Awaitable[tuple[VllmLikePublisher, KVBlockIndex, KVEventSubscriber, str]]]


async def test_connect_mode_gap_replay_and_restart(ctx: zmq.asyncio.Context) -> None:
    index = KVBlockIndex()
    ing = KVEventIngestor(index)
    sub = KVEventSubscriber(ing, context=ctx)
    pub = VllmLikePublisher(ctx, "kv@127.0.0.1@tiny")
    try:
        # History published before the EPP subscribed (EPP restart, late join).
        await pub.publish(stored(50), drop=True)
        await pub.publish(stored(51), drop=True)
        sub.connect_endpoint("127.0.0.1:8000", pub.address, replay_address=pub.replay_address)
        await until_joined(pub, index, "127.0.0.1:8000")
        # ... is replayed from seq 0 when the first message arrives.
        assert pub.replay_requests[0] == 0
        assert index.match([50, 51]) == {"127.0.0.1:8000": 2}
        await pub.publish(stored(1, 2))
        await pub.publish(stored(3), drop=True)  # lost on the wire ...
        await pub.publish(BlockRemoved(block_hashes=[2]), drop=True)
        await pub.publish(stored(4))  # ... gap detected here, replayed
        await eventually(lambda: bool(index.holders(4)))
        assert index.match([1, 2]) == {"127.0.0.1:8000": 1}
        assert index.holders(3) == {"127.0.0.1:8000"}
        assert ing.counts["gap"] == 1 and ing.counts["gap_unrecovered"] == 0
        assert ing.counts["replayed"] >= 2
        # Engine restart: a new publisher starts again at seq 0.
        await pub.close()
        pub = VllmLikePublisher(ctx, "kv@127.0.0.1@tiny")
        await sub.disconnect_endpoint("127.0.0.1:8000", purge=False)
        sub.connect_endpoint("127.0.0.1:8000", pub.address)
        await until_joined(pub, index, "127.0.0.1:8000", marker=10**15 + 1)
        assert ing.counts["restart"] == 1
        assert index.holders(1) == set() and index.holders(4) == set()
    finally:
        await sub.close()
        await pub.close()


async def test_bind_mode_topics_name_endpoints(ctx: zmq.asyncio.Context) -> None:
    index = KVBlockIndex()
    ing = KVEventIngestor(index, max_message_bytes=2048)
    sub = KVEventSubscriber(ing, context=ctx, config=SubscriberConfig(topic_filter="kv@"))
    known = {"127.0.0.1": "127.0.0.1:8000", "127.0.0.2": "127.0.0.2:8000"}
    address = sub.bind("tcp://127.0.0.1:0", TopicResolver(lookup=known.get))
    assert address.startswith("tcp://127.0.0.1:") and not address.endswith(":0")
    pubs = [
        VllmLikePublisher(ctx, "kv@127.0.0.1@tiny", connect_to=address),
        VllmLikePublisher(ctx, "kv@127.0.0.2@tiny", connect_to=address),
    ]
    stranger = VllmLikePublisher(ctx, "kv@10.6.6.6@tiny", connect_to=address)
    other_topic = VllmLikePublisher(ctx, "metrics@127.0.0.1", connect_to=address)
    try:
        # Slow joiner: publish until both endpoints are seen.
        async with asyncio.timeout(5):
            while (
                index.held_count("127.0.0.1:8000") == 0 or index.held_count("127.0.0.2:8000") == 0
            ):
                for i, p in enumerate(pubs):
                    await p.publish(stored(100 + i))
                await stranger.publish(stored(666))
                await other_topic.publish(stored(777))
                await asyncio.sleep(0.02)
        assert index.match([100]) == {"127.0.0.1:8000": 1}
        assert index.match([101]) == {"127.0.0.2:8000": 1}
        # Hostile input is counted and dropped; the socket keeps working.
        await pubs[0].send_raw([b"kv@127.0.0.1@tiny", b"\x00"])  # bad seq frame
        await pubs[0].send_raw([b"kv@127.0.0.1@tiny", encode_seq(10**6), b"\xc1\xc1"])
        await pubs[0].send_raw([b"kv@127.0.0.1@tiny", encode_seq(10**6 + 1), b"\x00" * 5000])
        await pubs[0].send_raw([b"kv@127.0.0.1@tiny"])
        await eventually(lambda: ing.counts["oversized"] == 1)
        await pubs[0].publish(stored(5))
        await eventually(lambda: bool(index.holders(5)))
        assert ing.counts["malformed"] == 3
        assert ing.counts["unknown_endpoint"] >= 1
        assert index.holders(666) == set() and index.holders(777) == set()
        assert set(index.endpoints()) == {"127.0.0.1:8000", "127.0.0.2:8000"}
    finally:
        await sub.close()
        for p in [*pubs, stranger, other_topic]:
            await p.close()


async def test_bind_mode_gap_replays_via_configured_address(ctx: zmq.asyncio.Context) -> None:
    index = KVBlockIndex()
    ing = KVEventIngestor(index)
    sub = KVEventSubscriber(ing, context=ctx)
    replay: dict[str, str] = {}
    address = sub.bind(
        "tcp://127.0.0.1:0",
        TopicResolver(mapping={"kv@a@m": "a:1"}),
        replay_address_for=replay.get,
    )
    pub = VllmLikePublisher(ctx, "kv@a@m", connect_to=address)
    replay["a:1"] = pub.replay_address
    try:
        await until_joined(pub, index, "a:1")
        await pub.publish(stored(1), drop=True)
        await pub.publish(stored(2))
        await eventually(lambda: bool(index.holders(2)))
        assert index.holders(1) == {"a:1"}
        assert ing.counts["gap_unrecovered"] == 0
    finally:
        await sub.close()
        await pub.close()


async def test_fetch_replay_times_out_on_silent_engine(ctx: zmq.asyncio.Context) -> None:
    silent = ctx.socket(zmq.ROUTER)
    port = silent.bind_to_random_port("tcp://127.0.0.1")
    try:
        with pytest.raises(TimeoutError):
            await fetch_replay(ctx, f"tcp://127.0.0.1:{port}", 0, timeout_s=0.2)
    finally:
        silent.close(linger=0)


async def test_fetch_replay_is_bounded(ctx: zmq.asyncio.Context) -> None:
    pub = VllmLikePublisher(ctx, "kv@x@m")
    try:
        for i in range(50):
            await pub.publish(stored(i), drop=True)
        got = await fetch_replay(ctx, pub.replay_address, 10, max_messages=5)
        assert [s for s, _ in got] == [10, 11, 12, 13, 14]
        got = await fetch_replay(ctx, pub.replay_address, 45)
        assert [s for s, _ in got] == [45, 46, 47, 48, 49]
    finally:
        await pub.close()


async def test_connect_mode_restart_with_lost_first_messages(ctx: zmq.asyncio.Context) -> None:
    """The engine restarts on the same address and its first messages are lost, so
    its sequence does not go backwards from our point of view: the socket monitor's
    disconnect marks the stream, and the discontinuity then purges and rebuilds."""
    index = KVBlockIndex()
    ing = KVEventIngestor(index)
    sub = KVEventSubscriber(ing, context=ctx)
    pub = VllmLikePublisher(ctx, "kv@x@m")
    port = int(pub.address.rsplit(":", 1)[1])
    try:
        sub.connect_endpoint("x:1", pub.address, replay_address=pub.replay_address)
        await until_joined(pub, index, "x:1")
        await pub.publish(stored(1))
        await eventually(lambda: bool(index.holders(1)))
        old_last = ing.last_seq("x:1")
        assert old_last is not None
        await pub.close()
        await asyncio.sleep(0.2)  # the subscriber notices the disconnect
        # New incarnation on the same PUB port (new replay socket: tell the subscriber).
        pub = VllmLikePublisher(ctx, "kv@x@m", bind_port=port)
        sub.set_replay_address("x:1", pub.replay_address)
        for i in range(old_last + 3):
            await pub.publish(stored(500 + i), drop=True)  # lost while reconnecting
        await until_joined(pub, index, "x:1", marker=10**15 + 7)
        assert ing.counts["restart"] == 1
        assert index.holders(1) == set()  # the old incarnation's blocks are gone
        assert index.holders(500) == {"x:1"}  # rebuilt from the new replay buffer
    finally:
        await sub.close()
        await pub.close()
