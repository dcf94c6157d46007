"""Block pool: ref counting, LRU eviction of unreferenced blocks, vLLM-shaped KV events."""

from __future__ import annotations

import pytest

from pdroute.protocol.blockhash import chain_block_hashes, to_event_hash
from pdroute.protocol.kv_events import AllBlocksCleared, BlockRemoved, BlockStored
from pdroute.sim.kvcache import BlockPool


def _hashes(n_blocks: int, start: int = 0, bs: int = 4) -> tuple[list[int], list[bytes]]:
    tokens = list(range(start, start + n_blocks * bs))
    return tokens, chain_block_hashes(tokens, bs)


def test_commit_emits_block_stored_chained_to_parent() -> None:
    pool = BlockPool(8, 4)
    tokens, hashes = _hashes(3)
    ids = pool.allocate([], 3)
    assert ids is not None
    assert pool.commit(ids, hashes, tokens, None) == 3
    [ev] = pool.drain_events()
    assert isinstance(ev, BlockStored)
    assert ev.block_hashes == [to_event_hash(h) for h in hashes]
    assert ev.parent_block_hash is None
    assert ev.token_ids == tokens
    assert ev.block_size == 4 and ev.medium == "GPU" and ev.extra_keys == [None, None, None]
    assert pool.lookup(hashes) == ids


def test_partial_commit_reports_parent_of_first_new_block() -> None:
    pool = BlockPool(8, 4)
    tokens, hashes = _hashes(2)
    a = pool.allocate([], 1)
    assert a is not None
    pool.commit(a, hashes[:1], tokens, None)
    pool.drain_events()
    b = pool.allocate(pool.lookup(hashes[:1]), 1)
    assert b is not None and b[0] == a[0]
    pool.commit(b, hashes, tokens, None)
    [ev] = pool.drain_events()
    assert isinstance(ev, BlockStored)
    assert ev.parent_block_hash == to_event_hash(hashes[0])
    assert ev.block_hashes == [to_event_hash(hashes[1])]
    assert ev.token_ids == tokens[4:8]


def test_lru_eviction_of_unreferenced_blocks_only() -> None:
    pool = BlockPool(4, 4)
    t1, h1 = _hashes(2, 0)
    t2, h2 = _hashes(2, 100)
    ids1 = pool.allocate([], 2)
    ids2 = pool.allocate([], 2)
    assert ids1 is not None and ids2 is not None
    pool.commit(ids1, h1, t1, None)
    pool.commit(ids2, h2, t2, None)
    pool.drain_events()
    assert pool.usage() == 1.0
    assert pool.allocate([], 1) is None  # everything referenced: nothing evictable
    pool.free(ids1)  # request 1 finished first -> its blocks are least recently used
    pool.free(ids2)
    assert pool.usage() == 0.0
    new = pool.allocate([], 1)
    assert new is not None
    # The freed tail block of request 1 is evicted first (vLLM frees in reverse order).
    [ev] = pool.drain_events()
    assert isinstance(ev, BlockRemoved)
    assert ev.block_hashes == [to_event_hash(h1[1])]
    assert pool.lookup(h1) == [ids1[0]]
    assert pool.lookup(h2) == ids2
    assert pool.evictions == 1


def test_cached_blocks_are_revived_not_evicted() -> None:
    pool = BlockPool(3, 4)
    tokens, hashes = _hashes(2)
    ids = pool.allocate([], 2)
    assert ids is not None
    pool.commit(ids, hashes, tokens, None)
    pool.free(ids)
    hits = pool.lookup(hashes)
    got = pool.allocate(hits, 1)
    assert got is not None and got[:2] == ids
    assert pool.ref_count(ids[0]) == 1
    assert pool.allocate([], 1) is None  # the only other block is now referenced
    assert not [e for e in pool.drain_events() if isinstance(e, BlockRemoved)]


def test_allocate_is_all_or_nothing() -> None:
    pool = BlockPool(2, 4)
    assert pool.allocate([], 3) is None
    assert pool.num_free == 2


def test_duplicate_hash_is_not_cached_twice() -> None:
    pool = BlockPool(4, 4)
    tokens, hashes = _hashes(1)
    a = pool.allocate([], 1)
    b = pool.allocate([], 1)
    assert a is not None and b is not None
    assert pool.commit(a, hashes, tokens, None) == 1
    assert pool.commit(b, hashes, tokens, None) == 0
    assert pool.block_hash(b[0]) is None


def test_double_free_is_an_error() -> None:
    pool = BlockPool(2, 4)
    ids = pool.allocate([], 1)
    assert ids is not None
    pool.free(ids)
    with pytest.raises(ValueError, match="freed more often"):
        pool.free(ids)


def test_reset_prefix_cache_only_when_idle() -> None:
    pool = BlockPool(2, 4)
    tokens, hashes = _hashes(1)
    ids = pool.allocate([], 1)
    assert ids is not None
    pool.commit(ids, hashes, tokens, None)
    assert not pool.reset_prefix_cache()
    pool.free(ids)
    pool.drain_events()
    assert pool.reset_prefix_cache()
    assert pool.drain_events() == [AllBlocksCleared()]
    assert pool.lookup(hashes) == []
