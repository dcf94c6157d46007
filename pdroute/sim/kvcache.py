"""The simulated KV cache: a fixed pool of token blocks with prefix caching.

Modelled on vLLM v1's ``BlockPool``/``FreeKVCacheBlockQueue``; pure and synchronous,
no clock, no I/O.

Invariant: each of the ``num_blocks`` blocks is in exactly one state:

- *referenced*: ``ref_cnt > 0`` (held by a running request or a P/D lease);
  not in the free queue;
- *free-cached*: ``ref_cnt == 0`` with a hash, in the free queue and in ``_cached``
  (a later request with the same prefix can revive it);
- *free-empty*: ``ref_cnt == 0`` without a hash, in the free queue.

``_cached`` maps a block hash to the one block holding it. Allocation takes blocks
from the head of the free queue (least recently freed first), evicting a cached hash
if the block had one; freed blocks go to the tail, a request's last block first,
so a sequence's tail is evicted before its head (as vLLM does). Every change of the
hash set is recorded as a KV event (``BlockStored`` / ``BlockRemoved`` /
``AllBlocksCleared``) in ``pending_events`` for the publisher to drain.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from pdroute.protocol.blockhash import to_event_hash
from pdroute.protocol.kv_events import (
    AllBlocksCleared,
    BlockHash,
    BlockRemoved,
    BlockStored,
    KVEvent,
)

MEDIUM = "GPU"
SPEC_KIND = "full_attention"


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._ref = [0] * num_blocks
        self._hash: list[bytes | None] = [None] * num_blocks
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._cached: dict[bytes, int] = {}
        self.pending_events: list[KVEvent] = []
        self.evictions = 0

    # ---- queries (no side effects) -------------------------------------------------
    @property
    def num_free(self) -> int:
        """Blocks not referenced by anyone (cached or empty)."""
        return len(self._free)

    def usage(self) -> float:
        """vLLM's ``kv_cache_usage_perc``: fraction of blocks referenced (0..1)."""
        return 1.0 - len(self._free) / self.num_blocks

    def lookup(self, hashes: Sequence[bytes]) -> list[int]:
        """Block ids of the longest cached prefix of ``hashes``."""
        out: list[int] = []
        for h in hashes:
            bid = self._cached.get(h)
            if bid is None:
                break
            out.append(bid)
        return out

    def block_hash(self, block_id: int) -> bytes | None:
        return self._hash[block_id]

    def ref_count(self, block_id: int) -> int:
        return self._ref[block_id]

    def is_cached(self, h: bytes) -> bool:
        return h in self._cached

    # ---- mutations -----------------------------------------------------------------
    def allocate(self, cached: Sequence[int], n_new: int) -> list[int] | None:
        """Reference the ``cached`` blocks and ``n_new`` fresh ones, or change nothing.

        Returns the block ids (cached first) or ``None`` when the pool cannot supply
        ``n_new`` blocks without evicting one of ``cached``.
        """
        reviving = sum(1 for b in cached if self._ref[b] == 0)
        if len(self._free) - reviving < n_new:
            return None
        for b in cached:
            if self._ref[b] == 0:
                del self._free[b]
            self._ref[b] += 1
        fresh: list[int] = []
        removed: list[BlockHash] = []
        for _ in range(n_new):
            b, _unused = self._free.popitem(last=False)
            h = self._hash[b]
            if h is not None:
                del self._cached[h]
                self._hash[b] = None
                removed.append(to_event_hash(h))
                self.evictions += 1
            self._ref[b] = 1
            fresh.append(b)
        if removed:
            self.pending_events.append(BlockRemoved(block_hashes=removed, medium=MEDIUM))
        return [*cached, *fresh]

    def commit(
        self,
        block_ids: Sequence[int],
        hashes: Sequence[bytes],
        tokens: Sequence[int],
        parent: bytes | None,
        *,
        lora_id: int | None = None,
        lora_name: str | None = None,
        extra_keys: tuple[object, ...] | None = None,
    ) -> int:
        """Make ``block_ids[i]`` hold full block ``i`` (hash ``hashes[i]``).

        Blocks already holding their hash are skipped; a hash cached in another block
        is not duplicated. One ``BlockStored`` event covers each run of newly cached
        blocks. Returns how many blocks were newly cached.
        """
        bs = self.block_size
        run_hashes: list[BlockHash] = []
        run_tokens: list[int] = []
        run_parent: bytes | None = None
        added = 0
        prev = parent

        def flush() -> None:
            if run_hashes:
                self.pending_events.append(
                    BlockStored(
                        block_hashes=list(run_hashes),
                        parent_block_hash=None if run_parent is None else to_event_hash(run_parent),
                        token_ids=list(run_tokens),
                        block_size=bs,
                        lora_id=lora_id,
                        medium=MEDIUM,
                        lora_name=lora_name,
                        extra_keys=[list(extra_keys) if extra_keys else None] * len(run_hashes),
                        group_idx=0,
                        kv_cache_spec_kind=SPEC_KIND,
                    )
                )
                run_hashes.clear()
                run_tokens.clear()

        for i, (bid, h) in enumerate(zip(block_ids, hashes, strict=False)):
            if self._hash[bid] == h or h in self._cached:
                flush()
            else:
                if self._hash[bid] is not None:
                    raise ValueError(f"block {bid} already holds another hash")
                if not run_hashes:
                    run_parent = prev
                self._hash[bid] = h
                self._cached[h] = bid
                run_hashes.append(to_event_hash(h))
                run_tokens.extend(tokens[i * bs : (i + 1) * bs])
                added += 1
            prev = h
        flush()
        return added

    def free(self, block_ids: Sequence[int]) -> None:
        """Drop one reference to each block; unreferenced blocks join the free tail."""
        for b in reversed(block_ids):
            if self._ref[b] <= 0:
                raise ValueError(f"block {b} freed more often than referenced")
            self._ref[b] -= 1
            if self._ref[b] == 0:
                self._free[b] = None

    def reset_prefix_cache(self) -> bool:
        """Forget every cached hash (vLLM's ``reset_prefix_cache``); only when idle."""
        if len(self._free) != self.num_blocks:
            return False
        self._cached.clear()
        self._hash = [None] * self.num_blocks
        self.pending_events.append(AllBlocksCleared())
        return True

    def drain_events(self) -> list[KVEvent]:
        ev, self.pending_events = self.pending_events, []
        return ev
