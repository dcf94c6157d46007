"""vLLM's KV-cache events on the wire (vLLM v1 ``distributed/kv_events.py``).

A ZMQ message has three frames: ``topic``, an 8-byte big-endian sequence number,
and a msgpack payload ``[ts, [event, ...], dp_rank]``. Each event is a msgpack map
whose ``type`` names it. Decoding uses typed msgspec structs: no pickle, unknown
fields ignored, wrong types rejected with ``msgspec.ValidationError``.
"""

from __future__ import annotations

import msgspec

BlockHash = int | bytes


class BlockStored(msgspec.Struct, tag="BlockStored", tag_field="type", omit_defaults=False):
    block_hashes: list[BlockHash]
    parent_block_hash: BlockHash | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None = None
    medium: str | None = None
    lora_name: str | None = None
    extra_keys: list[object] | None = None
    group_idx: int | None = None
    kv_cache_spec_kind: str | None = None


class BlockRemoved(msgspec.Struct, tag="BlockRemoved", tag_field="type"):
    block_hashes: list[BlockHash]
    medium: str | None = None
    group_idx: int | None = None


class AllBlocksCleared(msgspec.Struct, tag="AllBlocksCleared", tag_field="type"):
    medium: str | None = None


KVEvent = BlockStored | BlockRemoved | AllBlocksCleared


class EventBatch(msgspec.Struct, array_like=True):
    ts: float
    events: list[KVEvent]
    data_parallel_rank: int | None = None


_decoder = msgspec.msgpack.Decoder(EventBatch)
_encoder = msgspec.msgpack.Encoder()


def decode_payload(payload: bytes) -> EventBatch:
    """Decode the third frame; raises ``msgspec.DecodeError`` / ``ValidationError``."""
    return _decoder.decode(payload)


def encode_payload(batch: EventBatch) -> bytes:
    return _encoder.encode(batch)


def encode_seq(seq: int) -> bytes:
    return seq.to_bytes(8, "big", signed=False)


def decode_seq(frame: bytes) -> int:
    if len(frame) != 8:
        raise ValueError(f"sequence frame must be 8 bytes, got {len(frame)}")
    return int.from_bytes(frame, "big", signed=False)
