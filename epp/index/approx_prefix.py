"""Approximate prefix-cache index: which endpoint probably holds which prompt prefix.

The EPP never sees the engines' caches in this mode; it *assumes* that an endpoint
that served a prompt now caches that prompt's blocks (llm-d's
``approx-prefix-cache-producer``). A prompt is cut into blocks of ``block_chars``
UTF-8 bytes (``blockSizeTokens`` x 4 characters per token, chunked on bytes as the Go
reference does); block ``i`` is named by a chained 64-bit hash
``h_i = H(block_i || LE64(h_{i-1}))`` with ``h_0 = H(model [+ salt])``, so equal
hashes mean equal prefixes, and a final partial block is hashed too.

Invariant (checked by :meth:`ApproxPrefixIndex.check_invariant`): for every endpoint
``e`` and hash ``h``, ``h in lru[e]`` iff ``e in owners[h]``; no ``owners`` set is
empty; ``len(lru[e]) <= capacity`` for every ``e``. Memory is therefore bounded by
``capacity x endpoints``, and endpoints that leave the pool are purged via
:meth:`remove_endpoint` (wired to ``Datastore.on_endpoint_removed``).

Pure: no I/O, no clock, no asyncio; the hash function is injected.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Sequence

import xxhash

from epp.metrics import PREFIX_HIT_RATIO, PREFIX_INDEX_SIZE

#: ``bytes -> 64-bit int`` (default xxhash64 with seed 0, as llm-d uses).
HashFn = Callable[[bytes], int]

DEFAULT_LRU_CAPACITY = 31250
_LE64 = 8


_xxh64: HashFn = xxhash.xxh64_intdigest


def _chain(data: bytes, prev: int, block_chars: int, hash_fn: HashFn) -> list[int]:
    """``h_i = H(block_i || LE64(h_{i-1}))`` over ``data``, starting from ``prev``."""
    out: list[int] = []
    append = out.append
    for start in range(0, len(data), block_chars):
        prev = hash_fn(data[start : start + block_chars] + prev.to_bytes(_LE64, "little"))
        append(prev)
    return out


#: Blocks per memoized span (see :class:`_SpanMemo`).
SPAN_BLOCKS = 16
#: Bytes of prompt text the span memo may hold as keys (values are ~10% on top).
SPAN_MEMO_BYTES = 4 << 20


class _SpanMemo:
    """Chained hashes of whole spans of ``SPAN_BLOCKS`` blocks, keyed by
    ``(block_chars, hash before the span, span bytes)``.

    Prompts that share a prefix (system prompts, earlier turns) share its spans, and
    a span's hashes depend only on that key, so a hit returns exactly what hashing
    the span block by block would: one C-level bytes hash and compare instead of
    ``SPAN_BLOCKS`` slices, concatenations and xxhash calls. Only the built-in hash
    function is memoized (an injected one is always called).

    Invariant: the summed length of the key bytes is at most ``limit`` (oldest
    entries are dropped first), so memory is bounded whatever the traffic.
    """

    __slots__ = ("_bytes", "_entries", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._entries: dict[tuple[int, int, bytes], list[int]] = {}
        self._bytes = 0

    def hashes(self, data: bytes, prev: int, block_chars: int) -> list[int]:
        """Hashes of ``data`` (a whole number of spans) chained from ``prev``."""
        span = block_chars * SPAN_BLOCKS
        out: list[int] = []
        entries = self._entries
        for pos in range(0, len(data), span):
            chunk = data[pos : pos + span]
            key = (block_chars, prev, chunk)
            got = entries.get(key)
            if got is None:
                got = _chain(chunk, prev, block_chars, _xxh64)
                self._bytes += span
                while self._bytes > self.limit and entries:
                    old = next(iter(entries))
                    del entries[old]
                    self._bytes -= len(old[2])
                if self._bytes <= self.limit:
                    entries[key] = got
                else:  # pragma: no cover - a span larger than the whole budget
                    self._bytes -= span
            out += got
            prev = got[-1]
        return out

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()
        self._bytes = 0


_SPANS = _SpanMemo(SPAN_MEMO_BYTES)


def prefix_hashes(
    text: str,
    model: str,
    *,
    block_chars: int,
    max_blocks: int,
    salt: str = "",
    hash_fn: HashFn = _xxh64,
) -> list[int]:
    """The chained block hashes of ``text`` (at most ``max_blocks``).

    Text shorter than one block yields no hashes (nothing worth matching). Whole
    spans of :data:`SPAN_BLOCKS` blocks go through a bounded memo (same values,
    see :class:`_SpanMemo`); the tail is hashed block by block.
    """
    if block_chars <= 0 or max_blocks <= 0:
        return []
    limit = block_chars * max_blocks
    # Every character is >= 1 byte, so cutting characters first is safe and keeps
    # 100k-token prompts from being encoded in full.
    data = text[:limit].encode("utf-8", "surrogatepass")[:limit]
    n = len(data)
    if n < block_chars:
        return []
    prev = hash_fn((model + salt).encode("utf-8", "surrogatepass"))
    span = block_chars * SPAN_BLOCKS
    cut = n - n % span if hash_fn is _xxh64 else 0
    if cut == 0:
        return _chain(data, prev, block_chars, hash_fn)
    out = _SPANS.hashes(data[:cut] if cut < n else data, prev, block_chars)
    if cut < n:
        out += _chain(data[cut:], out[-1], block_chars, hash_fn)
    return out


def _size_of(ref: weakref.ref[ApproxPrefixIndex]) -> float:
    index = ref()
    return 0.0 if index is None else float(index._size)


class ApproxPrefixIndex:
    """hash -> endpoints that (probably) cache it, with a per-endpoint LRU bound."""

    __slots__ = ("__weakref__", "_capacity", "_hit_ratio", "_lru", "_owners", "_size")

    def __init__(
        self, *, capacity_per_endpoint: int = DEFAULT_LRU_CAPACITY, metrics_label: str = "approx"
    ) -> None:
        if capacity_per_endpoint <= 0:
            raise ValueError("capacity_per_endpoint must be > 0")
        self._capacity = capacity_per_endpoint
        self._owners: dict[int, set[str]] = {}
        self._lru: dict[str, OrderedDict[int, None]] = {}
        self._size = 0
        # Metric children bound once: no label lookup per request. The size gauge
        # reads ``_size`` when scraped (no gauge update per request); the weak
        # reference lets a discarded index go (its gauge then reads 0).
        ref = weakref.ref(self)
        PREFIX_INDEX_SIZE.labels(metrics_label).set_function(lambda: _size_of(ref))
        self._hit_ratio = PREFIX_HIT_RATIO.labels(metrics_label)

    @property
    def capacity_per_endpoint(self) -> int:
        return self._capacity

    def __len__(self) -> int:
        """Number of (endpoint, block) entries held."""
        return self._size

    def endpoints(self) -> list[str]:
        return list(self._lru)

    def blocks_of(self, endpoint: str) -> int:
        lru = self._lru.get(endpoint)
        return 0 if lru is None else len(lru)

    def match(self, hashes: Sequence[int]) -> dict[str, int]:
        """Blocks matched per endpoint, walking the chain until a hash nobody holds.

        Consecutive blocks usually have the same owners (a prompt is learned whole),
        so owner sets are counted per run of equal sets. The common case, one run
        over the whole matched chain, is found with C-level list operations (owner
        lookups, the first miss, one count of equal sets); otherwise the runs are
        walked in Python, one set comparison per block.
        """
        got = list(map(self._owners.get, hashes))
        try:
            cut = got.index(None)  # owner sets are never empty: None is the first miss
        except ValueError:
            cut = len(got)
        if cut == 0:
            return {}
        del got[cut:]
        first = got[0]
        assert first is not None
        if got.count(first) == cut:
            return dict.fromkeys(first, cut)
        counts: dict[str, int] = {}
        run = first
        n = 0
        for eps in got:
            if eps == run:
                n += 1
                continue
            for ep in run:
                counts[ep] = counts.get(ep, 0) + n
            assert eps is not None
            run = eps
            n = 1
        for ep in run:
            counts[ep] = counts.get(ep, 0) + n
        return counts

    def add(self, endpoint: str, hashes: Sequence[int]) -> None:
        """Record that ``endpoint`` now caches ``hashes`` (a prompt's chain).

        Blocks are touched last-to-first, so a prompt's leading blocks are the most
        recently used and are evicted last (a chain is useless without its head).
        """
        if not hashes:
            return
        lru = self._lru.get(endpoint)
        if lru is None:
            lru = self._lru[endpoint] = OrderedDict()
        owners = self._owners
        cap = self._capacity
        added = 0
        rev = hashes[::-1]
        touch = lru.move_to_end
        checked = False
        for i, h in enumerate(rev):
            if h in lru:
                if not checked:
                    # Usually every block from here on is held already (a shared
                    # prefix): touch them all in one C-level pass. Touching never
                    # evicts, so presence cannot change during the pass.
                    checked = True
                    rest = rev[i:]
                    if all(map(lru.__contains__, rest)):
                        deque(map(touch, rest), maxlen=0)
                        break
                touch(h)
                continue
            lru[h] = None
            s = owners.get(h)
            if s is None:
                owners[h] = {endpoint}
            else:
                s.add(endpoint)
            added += 1
            if len(lru) > cap:
                old, _ = lru.popitem(last=False)
                self._drop_owner(old, endpoint)
                added -= 1
        self._size += added

    def remove_endpoint(self, endpoint: str) -> None:
        """Forget everything about ``endpoint`` (it left the pool)."""
        lru = self._lru.pop(endpoint, None)
        if lru is None:
            return
        for h in lru:
            self._drop_owner(h, endpoint)
        self._size -= len(lru)

    def retain(self, endpoints: Iterable[str]) -> None:
        """Purge every endpoint not in ``endpoints``."""
        keep = set(endpoints)
        for ep in [e for e in self._lru if e not in keep]:
            self.remove_endpoint(ep)

    def record_hit_ratio(self, ratio: float) -> None:
        self._hit_ratio.observe(ratio)

    def _drop_owner(self, h: int, endpoint: str) -> None:
        s = self._owners.get(h)
        if s is None:
            return
        s.discard(endpoint)
        if not s:
            del self._owners[h]

    def check_invariant(self) -> None:
        """Assert the invariant in the module docstring (for tests; O(size))."""
        total = 0
        for ep, lru in self._lru.items():
            assert len(lru) <= self._capacity, (ep, len(lru))
            total += len(lru)
            for h in lru:
                assert ep in self._owners.get(h, ()), (ep, h)
        for h, eps in self._owners.items():
            assert eps, h
            for ep in eps:
                assert h in self._lru.get(ep, ()), (ep, h)
        assert total == self._size, (total, self._size)
