"""A real ZMQ subscriber receives the simulator's KV events (bind and connect modes, replay)."""

from __future__ import annotations

import asyncio

import aiohttp
import zmq
import zmq.asyncio

from pdroute.protocol.blockhash import chain_block_hashes, to_event_hash
from pdroute.protocol.kv_events import BlockRemoved, BlockStored, decode_payload, decode_seq
from pdroute.sim.config import SimConfig
from pdroute.sim.fleet import SimFleet
from pdroute.sim.kvevents import END_SEQ, should_bind
from pdroute.sim.latency import get_profile
from pdroute.sim.tokenizer import Tokenizer
from tests.netutil import free_port

PROMPT = "kv events travel over zmq " * 10


def cfg(endpoint: str, **kw: object) -> SimConfig:
    opts: dict[str, object] = {"model": "m", "block_size": 16, "num_blocks": 64, **kw}
    return SimConfig(
        profile=get_profile("fast"),
        kv_events_endpoint=endpoint,
        **opts,  # type: ignore[arg-type]
    )


async def complete(addr: str, prompt: str = PROMPT) -> None:
    async with (
        aiohttp.ClientSession() as s,
        s.post(f"http://{addr}/v1/completions", json={"prompt": prompt, "max_tokens": 1}) as r,
    ):
        assert r.status == 200


async def recv(sub: zmq.asyncio.Socket) -> list[bytes]:
    return list(await asyncio.wait_for(sub.recv_multipart(), 5.0))


def test_bind_rule_matches_vllm() -> None:
    assert should_bind("tcp://*:5557") and should_bind("tcp://[::]:5557")
    assert should_bind("ipc:///tmp/x") and should_bind("inproc://x")
    assert not should_bind("tcp://127.0.0.1:5557")


async def test_sim_binds_subscriber_connects() -> None:
    ctx = zmq.asyncio.Context()
    async with SimFleet(cfg("tcp://127.0.0.1:*", kv_events_topic="kv@{port}")) as f:
        endpoint = f.kv_event_endpoints[0]
        assert endpoint and endpoint.startswith("tcp://127.0.0.1:")
        sub = ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(endpoint)
        await asyncio.sleep(0.3)  # ZMQ slow joiner
        await complete(f.addresses[0])
        topic, seq, payload = await recv(sub)
        sub.close(0)
    ctx.term()
    assert topic == f"kv@{f.ports[0]}".encode()
    assert decode_seq(seq) == 0
    batch = decode_payload(payload)
    [ev] = batch.events
    assert isinstance(ev, BlockStored)
    ids = Tokenizer().encode(PROMPT)
    assert ev.block_hashes == [to_event_hash(h) for h in chain_block_hashes(ids, 16)]
    assert ev.token_ids == ids[: len(ev.block_hashes) * 16]
    assert batch.data_parallel_rank == 0


async def test_subscriber_binds_sim_connects_and_sees_evictions() -> None:
    ctx = zmq.asyncio.Context()
    port = free_port()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.bind(f"tcp://127.0.0.1:{port}")
    got: asyncio.Queue[list[bytes]] = asyncio.Queue()

    async def reader() -> None:
        # A binding SUB only sends its subscription to a connecting PUB while it is
        # being polled, so keep a receive pending from the start (as the EPP does).
        while True:
            await got.put(list(await sub.recv_multipart()))

    task = asyncio.get_running_loop().create_task(reader())
    seen: list[object] = []
    seqs: list[int] = []
    try:
        # 5 blocks in the cache, 4 per request: the second prompt evicts the first's.
        c = cfg(f"tcp://127.0.0.1:{port}", num_blocks=5, kv_events_topic="t")
        async with SimFleet(c) as f:
            await asyncio.sleep(0.3)  # connect + subscription handshake
            await complete(f.addresses[0], "a " * 30)
            await complete(f.addresses[0], "b " * 30)
            while not any(isinstance(e, BlockRemoved) for e in seen):
                topic, seq, payload = await asyncio.wait_for(got.get(), 5.0)
                assert topic == b"t"
                seqs.append(decode_seq(seq))
                seen.extend(decode_payload(payload).events)
    finally:
        task.cancel()
        sub.close(0)
        ctx.term()
    assert seqs == list(range(len(seqs)))
    first = Tokenizer().encode("a " * 30)
    removed = [e for e in seen if isinstance(e, BlockRemoved)]
    evicted = {h for e in removed for h in e.block_hashes}
    assert evicted
    assert evicted <= {to_event_hash(h) for h in chain_block_hashes(first, 16)}


async def test_replay_returns_buffered_batches_then_end() -> None:
    ctx = zmq.asyncio.Context()
    replay_port = free_port()
    c = cfg("tcp://127.0.0.1:*", replay_endpoint=f"tcp://127.0.0.1:{replay_port}")
    async with SimFleet(c) as f:
        await complete(f.addresses[0], "x " * 40)
        await complete(f.addresses[0], "y " * 40)
        dealer = ctx.socket(zmq.DEALER)
        dealer.connect(f"tcp://127.0.0.1:{replay_port}")
        await dealer.send_multipart([b"", (1).to_bytes(8, "big")])
        got: list[int] = []
        while True:
            frames = await asyncio.wait_for(dealer.recv_multipart(), 5.0)
            assert frames[0] == b""
            if frames[1] == END_SEQ:
                assert frames[2] == b""
                break
            got.append(decode_seq(frames[1]))
            decode_payload(frames[2])
        dealer.close(0)
    ctx.term()
    assert got == [1]
