"""A bounded memo in front of vLLM's block hash (sha256 over a pickled tuple).

vLLM hashes every full block of every prompt; with shared prefixes (system prompts,
multi-turn chats, few-shot examples) the same ``(parent, tokens, extra_keys)`` comes
back again and again, and sha256 + pickle costs ~2 us a block, the largest per-token
cost of a long prompt in the simulator. The input tuple is hashable, so it is the key.

Invariant: ``memo(obj) == fn(obj)`` for every ``obj`` (a pure function's memo); memory
is bounded by two generations of at most ``size`` entries each: lookups hit the young
one, then the old one (promoting the entry); when the young generation is full it
becomes the old one and the previous old one is dropped (an approximate LRU, O(1)).
One memo per hash function is shared by every simulated server of the process.
"""

from __future__ import annotations

from typing import Any

from pdroute.protocol.blockhash import HashFn

#: Entries per generation (~0.9 KB each for a 16-token block: ~15 MB for both at most).
DEFAULT_SIZE = 8192


class MemoHash:
    __slots__ = ("fn", "old", "size", "young")

    def __init__(self, fn: HashFn, size: int = DEFAULT_SIZE) -> None:
        if size <= 0:
            raise ValueError("size must be positive")
        self.fn = fn
        self.size = size
        self.young: dict[Any, bytes] = {}
        self.old: dict[Any, bytes] = {}

    def __call__(self, obj: Any) -> bytes:
        young = self.young
        try:
            h = young.get(obj)
        except TypeError:  # an unhashable input (never from the simulator): no memo
            return self.fn(obj)
        if h is not None:
            return h
        h = self.old.get(obj)
        if h is None:
            h = self.fn(obj)
        if len(young) >= self.size:
            self.old = young
            young = self.young = {}
        young[obj] = h
        return h


_SHARED: dict[HashFn, MemoHash] = {}


def memo_hash(fn: HashFn) -> MemoHash:
    """The process-wide memo for ``fn`` (created on first use)."""
    memo = _SHARED.get(fn)
    if memo is None:
        memo = _SHARED[fn] = MemoHash(fn)
    return memo
