"""KV-event ingestion without sockets: decoding, sequence gaps, replay, restarts."""

from __future__ import annotations

import msgspec

from epp.datalayer.kvevents import KVEventIngestor, ReplayRequest, TopicResolver, decode_batch
from epp.index.kvblock import KVBlockIndex
from epp.metrics import KV_EVENTS
from pdroute.protocol.kv_events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    EventBatch,
    encode_payload,
)


def stored(*hashes: int, parent: int | None = None) -> BlockStored:
    return BlockStored(
        block_hashes=list(hashes),
        parent_block_hash=parent,
        token_ids=[1] * (16 * len(hashes)),
        block_size=16,
        medium="GPU",
    )


def batch(*events: BlockStored | BlockRemoved | AllBlocksCleared) -> bytes:
    return encode_payload(EventBatch(ts=1.0, events=list(events), data_parallel_rank=0))


def make() -> tuple[KVBlockIndex, KVEventIngestor]:
    index = KVBlockIndex()
    return index, KVEventIngestor(index, max_message_bytes=4096)


def test_all_three_wire_encodings_decode() -> None:
    # vLLM 0.32: array batch, map events (the shared protocol module's encoding).
    a = decode_batch(batch(stored(1, 2), BlockRemoved(block_hashes=[1]), AllBlocksCleared()))
    assert [type(e).__name__ for e in a] == ["_Stored", "_Removed", "_Cleared"]
    # Newer vLLM: the batch itself is a map.
    m = msgspec.msgpack.encode(
        {"ts": 1.0, "events": [{"type": "BlockRemoved", "block_hashes": [5], "medium": None}]}
    )
    assert decode_batch(m)[0].block_hashes == [5]
    # Older vLLM: tagged arrays.
    old = msgspec.msgpack.encode(
        [1.0, [["BlockStored", [7, 8], None, [1] * 32, 16, None, "GPU"], ["AllBlocksCleared"]]]
    )
    ev = decode_batch(old)
    assert ev[0].block_hashes == [7, 8] and type(ev[1]).__name__ == "_ClearedL"
    index, ing = make()
    ing.apply("e", old)
    assert index.held_count("e") == 0  # stored then cleared
    assert ing.counts["applied"] == 2
    # Truncated or corrupted payloads (even invalid UTF-8 in a tag) are malformed.
    assert ing.apply("e", old[:-1] + b"\x90") == 0
    assert ing.apply("e", old[:40]) == 0
    assert ing.counts["malformed"] == 2 and index.held_count("e") == 0


def test_events_apply_in_order() -> None:
    index, ing = make()
    ing.on_message("e", 0, batch(stored(1, 2, 3)))
    ing.on_message("e", 1, batch(BlockRemoved(block_hashes=[3])))
    assert index.match([1, 2, 3]) == {"e": 2}
    ing.on_message("e", 2, batch(AllBlocksCleared(), stored(9)))
    assert index.match([1]) == {} and index.match([9]) == {"e": 1}
    assert ing.counts["applied"] == 4
    assert ing.last_seq("e") == 2


def test_malformed_and_oversized_are_counted_and_ignored() -> None:
    index, ing = make()
    before = KV_EVENTS.labels("malformed")._value.get()
    ing.on_message("e", 0, b"\xc1garbage")
    ing.on_message("e", 1, msgspec.msgpack.encode([1.0, [{"type": "BlockStored"}], 0]))
    ing.on_message("e", 2, msgspec.msgpack.encode([1.0, [{"type": "Nope", "x": 1}], 0]))
    ing.on_message("e", 3, batch(stored(*range(1000, 1400))))  # > 4096 bytes
    ing.on_message("e", 4, batch(stored(1)))
    assert ing.counts["malformed"] == 3
    assert ing.counts["oversized"] == 1
    assert KV_EVENTS.labels("malformed")._value.get() - before == 3
    assert index.match([1]) == {"e": 1}


def test_gap_without_replay_is_counted_and_applied() -> None:
    index, ing = make()
    ing.on_message("e", 0, batch(stored(1)))
    assert ing.on_message("e", 5, batch(stored(2))) is None
    assert ing.counts["gap"] == 1 and ing.counts["gap_unrecovered"] == 4
    assert index.match([1, 2]) == {"e": 2}


def test_gap_with_replay_recovers_in_order() -> None:
    index, ing = make()
    msgs = {i: batch(stored(100 + i)) for i in range(6)}
    msgs[3] = batch(BlockRemoved(block_hashes=[101]))
    ing.on_message("e", 0, msgs[0], can_replay=True)
    ing.on_message("e", 1, msgs[1], can_replay=True)
    req = ing.on_message("e", 4, msgs[4], can_replay=True)
    assert req == ReplayRequest("e", 2, 4)
    # Live messages that arrive during the replay wait.
    assert ing.on_message("e", 5, msgs[5], can_replay=True) is None
    assert index.holders(105) == set()
    # The engine replays everything from 2 (4 and 5 again, too).
    ing.replay_done(req, [(i, msgs[i]) for i in range(2, 6)])
    assert ing.counts["replayed"] == 2 and ing.counts["gap_unrecovered"] == 0
    assert ing.last_seq("e") == 5
    assert index.holders(101) == set()  # removed by replayed seq 3
    assert all(index.holders(100 + i) == {"e"} for i in (0, 2, 4, 5))
    assert ing.counts["applied"] == 6


def test_failed_replay_counts_unrecovered_and_continues() -> None:
    index, ing = make()
    ing.on_message("e", 0, batch(stored(1)), can_replay=True)
    req = ing.on_message("e", 3, batch(stored(4)), can_replay=True)
    assert req is not None
    ing.replay_done(req, None)
    assert ing.counts["gap_unrecovered"] == 2
    assert ing.last_seq("e") == 3 and index.holders(4) == {"e"}


def test_first_message_replays_history_from_zero() -> None:
    index, ing = make()
    req = ing.on_message("e", 2, batch(stored(3)), can_replay=True)
    assert req == ReplayRequest("e", 0, 2)
    ing.replay_done(req, [(0, batch(stored(1))), (1, batch(stored(2)))])
    assert index.match([1, 2, 3]) == {"e": 3}
    assert ing.counts["gap"] == 0  # joining late is not a gap


def test_sequence_going_backwards_is_a_restart() -> None:
    index, ing = make()
    ing.on_message("e", 0, batch(stored(1, 2)))
    ing.on_message("e", 1, batch(stored(3)))
    ing.on_message("other", 0, batch(stored(1)))
    ing.on_message("e", 0, batch(stored(7)))  # engine restarted: new publisher
    assert ing.counts["restart"] == 1
    assert index.match([1, 2]) == {"other": 1}
    assert index.match([7]) == {"e": 1}
    assert ing.last_seq("e") == 0


def test_forget_purges_endpoint() -> None:
    index, ing = make()
    ing.on_message("e", 0, batch(stored(1)))
    ing.forget("e")
    assert index.match([1]) == {} and ing.last_seq("e") is None


def test_pending_buffer_during_replay_is_bounded() -> None:
    index = KVBlockIndex()
    ing = KVEventIngestor(index, max_pending=3)
    ing.on_message("e", 0, batch(stored(1)), can_replay=True)
    req = ing.on_message("e", 2, batch(stored(3)), can_replay=True)
    assert req is not None
    for seq in range(3, 10):
        ing.on_message("e", seq, batch(stored(seq + 1)), can_replay=True)
    assert ing.counts["dropped"] == 5
    ing.replay_done(req, [(1, batch(stored(2)))])
    assert ing.last_seq("e") == 9
    assert ing.counts["gap"] == 2  # the dropped run shows up as a second gap


def test_topic_resolver() -> None:
    known = {"10.0.0.1": "10.0.0.1:8000"}
    r = TopicResolver(mapping={"custom": "x:1"}, lookup=known.get)
    assert r.resolve("kv@10.0.0.1@llama") == "10.0.0.1:8000"
    assert r.resolve("kv@10.9.9.9@llama") is None
    assert r.resolve("custom") == "x:1"
    assert r.resolve("kv") is None


def test_fuzzed_payloads_never_raise() -> None:
    import random

    rng = random.Random(3)
    good = batch(stored(1, 2), BlockRemoved(block_hashes=[2]), AllBlocksCleared(), stored(5))
    index, ing = make()
    for i in range(2000):
        b = bytearray(good)
        for _ in range(rng.randrange(1, 4)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        cut = rng.randrange(len(b) + 1)
        ing.on_message("e", i, bytes(b[:cut]))
    assert ing.counts["malformed"] > 1000
    index.check_invariant()


def test_non_prefix_cache_groups_are_filtered() -> None:
    """Hybrid models: a sliding-window group's stores do not count, and its removals
    must not drop blocks the full-attention group still holds."""
    index, ing = make()
    full = msgspec.msgpack.encode(
        [1.0, [{"type": "BlockStored", "block_hashes": [1, 2], "parent_block_hash": None,
                "token_ids": [0] * 32, "block_size": 16, "group_idx": 0,
                "kv_cache_spec_kind": "full_attention"},
               {"type": "BlockStored", "block_hashes": [1, 2], "parent_block_hash": None,
                "token_ids": [0] * 32, "block_size": 16, "group_idx": 1,
                "kv_cache_spec_kind": "sliding_window"},
               {"type": "BlockStored", "block_hashes": [9], "parent_block_hash": None,
                "token_ids": [0] * 16, "block_size": 16, "group_idx": 1,
                "kv_cache_spec_kind": "sliding_window"}], 0]
    )  # fmt: skip
    ing.on_message("e", 0, full)
    assert index.match([1, 2]) == {"e": 2} and index.holders(9) == set()
    removed = msgspec.msgpack.encode(
        [1.0, [{"type": "BlockRemoved", "block_hashes": [1], "group_idx": 1},
               {"type": "BlockRemoved", "block_hashes": [2], "group_idx": 0}], 0]
    )  # fmt: skip
    ing.on_message("e", 1, removed)
    assert index.match([1, 2]) == {"e": 1}
    assert ing.counts["filtered"] == 3 and ing.counts["applied"] == 2


def test_reconnect_then_discontinuity_is_a_restart() -> None:
    index, ing = make()
    for seq in range(3):
        ing.on_message("e", seq, batch(stored(10 + seq)))
    # A reconnect that continues the sequence is just a network blip.
    ing.on_reconnect("e")
    ing.on_message("e", 3, batch(stored(13)))
    assert ing.counts["restart"] == 0 and index.held_count("e") == 4
    # After a reconnect, a jump (the new engine's first messages were lost) means a
    # new incarnation: purge and rebuild from its replay buffer from seq 0.
    ing.on_reconnect("e")
    req = ing.on_message("e", 7, batch(stored(99)), can_replay=True)
    assert ing.counts["restart"] == 1 and index.held_count("e") == 0
    assert req == ReplayRequest("e", 0, 7)
    ing.replay_done(req, [(i, batch(stored(90 + i))) for i in range(7)])
    assert index.match([90, 91]) == {"e": 2} and index.holders(10) == set()
    assert index.holders(99) == {"e"}
