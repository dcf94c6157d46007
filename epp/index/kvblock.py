"""Precise KV-block index: which endpoint holds which prefix-cache block.

Fed by the engines' KV events (``BlockStored`` / ``BlockRemoved`` /
``AllBlocksCleared``, see :mod:`epp.datalayer.kvevents`) and read by the
precise prefix-cache producer, which asks for the *longest consecutive run* of a
request's prefix blocks that each endpoint holds.

Design
------
* A block key is the 64-bit integer the engine publishes (``to_event_hash`` of
  vLLM's block digest), or, in *re-key* mode, a key the EPP computes itself from
  the events' ``token_ids`` with the same function it uses for requests, so the
  engine's hash algorithm and seed need not be known.
* Endpoints get a small integer *slot*; ``_holders`` maps a key to a bitmask of
  the slots that hold it, so a lookup is one dict probe and one AND per block.
  Slots 0..7 give masks below 256, which CPython interns: no per-entry int.
* Each slot has its own LRU (an ``OrderedDict``) bounded by a per-endpoint
  capacity (for example the engine's ``num_gpu_blocks``); storing past capacity
  evicts that endpoint's least recently stored block. Memory is therefore bounded
  by ``capacity x endpoints`` (``max_endpoints`` caps the latter).
* Speculative entries: after a routing decision the chosen endpoint is assumed to
  hold the request's blocks for a short TTL (default 2 s) so a burst of requests
  with the same prefix lands on the same endpoint before its events arrive.
  They live in a separate mask map and never touch the LRUs.
* Pure data structure: no I/O, no asyncio, not thread-safe (one event loop owns
  it); the clock is injected.

Invariant (checked by :meth:`KVBlockIndex.check_invariant` in tests)
---------------------------------------------------------------------
For every slot ``s`` and key ``k``: bit ``s`` of ``_holders[k]`` is set iff
``k`` is in ``_lru[s]``; no key maps to mask 0; ``len(_lru[s]) <= capacity(s)``;
in re-key mode ``_rev[s]`` maps each key of ``_lru[s]`` that came from an event
to its engine hash and ``_fwd[s]`` is the exact inverse. For speculative
entries, bit ``s`` of ``_spec[k]`` is set iff ``k`` is in ``_spec_exp[s]``.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass

Clock = Callable[[], float]
#: Re-keying function: (parent key or None for the first block, token ids of whole
#: blocks) -> one key per block, chained from the parent.
Rekeyer = Callable[[int | None, Sequence[int]], list[int]]

DEFAULT_CAPACITY = 131_072
DEFAULT_SPECULATIVE_TTL_S = 2.0


class UnknownEndpoint(KeyError):
    """Raised when more endpoints are added than ``max_endpoints`` allows."""


@dataclass(frozen=True, slots=True)
class IndexStats:
    endpoints: int
    keys: int
    entries: int
    speculative_entries: int
    evictions: int


class KVBlockIndex:
    """Block key -> endpoints, with per-endpoint LRU capacity and speculation."""

    __slots__ = (
        "_capacity",
        "_clock",
        "_default_capacity",
        "_evictions",
        "_free",
        "_fwd",
        "_holders",
        "_lru",
        "_max_endpoints",
        "_max_speculative",
        "_names",
        "_rekey",
        "_rev",
        "_slots",
        "_spec",
        "_spec_count",
        "_spec_exp",
        "_spec_queue",
        "speculative_ttl_s",
    )

    def __init__(
        self,
        *,
        capacity_per_endpoint: int = DEFAULT_CAPACITY,
        max_endpoints: int = 1024,
        speculative_ttl_s: float = DEFAULT_SPECULATIVE_TTL_S,
        max_speculative_entries: int = 1_000_000,
        clock: Clock = time.monotonic,
        rekey: Rekeyer | None = None,
    ) -> None:
        if capacity_per_endpoint <= 0:
            raise ValueError("capacity_per_endpoint must be positive")
        if max_endpoints <= 0:
            raise ValueError("max_endpoints must be positive")
        self._default_capacity = capacity_per_endpoint
        self._max_endpoints = max_endpoints
        self._max_speculative = max_speculative_entries
        self.speculative_ttl_s = speculative_ttl_s
        self._clock = clock
        self._rekey = rekey
        self._slots: dict[str, int] = {}
        self._names: list[str | None] = []
        self._free: list[int] = []
        self._lru: list[OrderedDict[int, None]] = []
        self._capacity: list[int] = []
        self._fwd: list[dict[int, int]] = []  # engine hash -> key (re-key mode)
        self._rev: list[dict[int, int]] = []  # key -> engine hash (re-key mode)
        self._holders: dict[int, int] = {}
        self._evictions = 0
        self._spec: dict[int, int] = {}
        self._spec_exp: list[dict[int, float]] = []
        self._spec_queue: deque[tuple[float, int, Sequence[int]]] = deque()
        self._spec_count = 0

    # ------------------------------------------------------------------ endpoints

    @property
    def rekeying(self) -> bool:
        return self._rekey is not None

    def slot(self, endpoint: str) -> int:
        """The slot of ``endpoint``, allocated on first use (the ingest hot path
        resolves it once per event batch)."""
        s = self._slots.get(endpoint)
        if s is not None:
            return s
        if self._free:
            s = self._free.pop()
            self._names[s] = endpoint
        else:
            s = len(self._names)
            if s >= self._max_endpoints:
                raise UnknownEndpoint(f"index full: max_endpoints={self._max_endpoints}")
            self._names.append(endpoint)
            self._lru.append(OrderedDict())
            self._capacity.append(self._default_capacity)
            self._fwd.append({})
            self._rev.append({})
            self._spec_exp.append({})
        self._capacity[s] = self._default_capacity
        self._slots[endpoint] = s
        return s

    def endpoints(self) -> list[str]:
        return list(self._slots)

    def set_capacity(self, endpoint: str, capacity: int) -> None:
        """Bound ``endpoint``'s entries (e.g. to its ``num_gpu_blocks``); evicts now."""
        if capacity <= 0:
            raise ValueError("capacity must be positive")
        s = self.slot(endpoint)
        self._capacity[s] = capacity
        self._evict(s)

    def capacity(self, endpoint: str) -> int:
        s = self._slots.get(endpoint)
        return self._default_capacity if s is None else self._capacity[s]

    def clear(self, endpoint: str) -> None:
        """``AllBlocksCleared`` / engine restart: drop every block of ``endpoint``
        (speculative entries too); the endpoint stays known."""
        s = self._slots.get(endpoint)
        if s is not None:
            self._clear_slot(s)

    def remove_endpoint(self, endpoint: str) -> None:
        """The endpoint left the pool: purge it and recycle its slot."""
        s = self._slots.pop(endpoint, None)
        if s is None:
            return
        self._clear_slot(s)
        self._names[s] = None
        self._free.append(s)

    def _clear_slot(self, s: int) -> None:
        lru = self._lru[s]
        holders = self._holders
        keep = ~(1 << s)
        for k in lru:
            m = holders[k] & keep
            if m:
                holders[k] = m
            else:
                del holders[k]
        lru.clear()
        self._fwd[s].clear()
        self._rev[s].clear()
        exp = self._spec_exp[s]
        if exp:
            spec = self._spec
            for k in exp:
                m = spec[k] & keep
                if m:
                    spec[k] = m
                else:
                    del spec[k]
            self._spec_count -= len(exp)
            exp.clear()

    # ------------------------------------------------------------------ events

    def store(self, s: int, keys: Iterable[int]) -> None:
        """``BlockStored`` with keys as published (direct mode); newest last."""
        self.store_runs(s, (keys,))

    def store_runs(self, s: int, runs: Iterable[Iterable[int]]) -> None:
        """Several consecutive ``BlockStored`` events of one batch (the ingest hot
        path: one call per batch instead of one per event)."""
        lru = self._lru[s]
        holders = self._holders
        hget = holders.get
        touch = lru.move_to_end
        bit = 1 << s
        for keys in runs:
            for k in keys:
                if k in lru:
                    touch(k)
                else:
                    lru[k] = None
                    holders[k] = hget(k, 0) | bit
        if len(lru) > self._capacity[s]:
            self._evict(s)

    def store_tokens(
        self, s: int, engine_hashes: Sequence[int], parent: int | None, token_ids: Sequence[int]
    ) -> bool:
        """``BlockStored`` in re-key mode: recompute keys from ``token_ids`` chained
        from the key of the engine's ``parent`` block. Returns False (nothing
        stored) when the parent is unknown or the token count does not match."""
        rekey = self._rekey
        if rekey is None:
            self.store(s, engine_hashes)
            return True
        fwd = self._fwd[s]
        if parent is None:
            parent_key = None
        else:
            parent_key = fwd.get(parent)
            if parent_key is None:
                return False
        keys = rekey(parent_key, token_ids)
        if len(keys) != len(engine_hashes):
            return False
        rev = self._rev[s]
        for eh, k in zip(engine_hashes, keys, strict=True):
            old = fwd.get(eh)
            if old is not None and old != k:
                rev.pop(old, None)
            prev = rev.get(k)
            if prev is not None and prev != eh:
                fwd.pop(prev, None)
            fwd[eh] = k
            rev[k] = eh
        self.store(s, keys)
        return True

    def remove(self, s: int, keys: Iterable[int]) -> None:
        """``BlockRemoved`` (engine hashes; translated in re-key mode)."""
        lru = self._lru[s]
        holders = self._holders
        keep = ~(1 << s)
        if self._rekey is not None:
            fwd = self._fwd[s]
            rev = self._rev[s]
            mapped = []
            for eh in keys:
                k = fwd.pop(eh, None)
                if k is not None:
                    rev.pop(k, None)
                    mapped.append(k)
            keys = mapped
        for k in keys:
            if k in lru:
                del lru[k]
                m = holders[k] & keep
                if m:
                    holders[k] = m
                else:
                    del holders[k]

    def _evict(self, s: int) -> None:
        lru = self._lru[s]
        excess = len(lru) - self._capacity[s]
        if excess <= 0:
            return
        holders = self._holders
        keep = ~(1 << s)
        pop = lru.popitem
        rev = self._rev[s] if self._rekey is not None else None
        for _ in range(excess):
            k = pop(last=False)[0]
            m = holders[k] & keep
            if m:
                holders[k] = m
            else:
                del holders[k]
            if rev is not None:
                eh = rev.pop(k, None)
                if eh is not None:
                    self._fwd[s].pop(eh, None)
        self._evictions += excess

    # ------------------------------------------------------------------ speculation

    def speculate(self, endpoint: str, keys: Sequence[int], ttl_s: float | None = None) -> None:
        """Assume ``endpoint`` holds ``keys`` until ``now + ttl`` (a routing decision
        was just made; the engine's events will follow)."""
        if not keys:
            return
        now = self._clock()
        self._expire(now)
        s = self.slot(endpoint)
        exp_at = now + (self.speculative_ttl_s if ttl_s is None else ttl_s)
        exp = self._spec_exp[s]
        spec = self._spec
        sget = spec.get
        bit = 1 << s
        before = len(exp)
        for k in keys:
            exp[k] = exp_at
            spec[k] = sget(k, 0) | bit
        self._spec_count += len(exp) - before
        self._spec_queue.append((exp_at, s, keys))
        while self._spec_count > self._max_speculative and self._spec_queue:
            self._expire_head()

    def _expire(self, now: float) -> None:
        q = self._spec_queue
        while q and q[0][0] <= now:
            self._expire_head()

    def _expire_head(self) -> None:
        exp_at, s, keys = self._spec_queue.popleft()
        exp = self._spec_exp[s]
        spec = self._spec
        keep = ~(1 << s)
        for k in keys:
            # Only drop entries not refreshed by a later speculation.
            if exp.get(k, -1.0) <= exp_at and k in exp:
                del exp[k]
                self._spec_count -= 1
                m = spec[k] & keep
                if m:
                    spec[k] = m
                else:
                    del spec[k]

    # ------------------------------------------------------------------ lookup

    def match(
        self, keys: Sequence[int], candidates: Collection[str] | None = None
    ) -> dict[str, int]:
        """Longest consecutive run of ``keys`` (from the first) each endpoint holds.

        Only endpoints with at least one matching block appear. ``candidates``
        restricts the answer (and speeds up the scan: it stops as soon as no
        candidate still matches).
        """
        if not keys:
            return {}
        if candidates is None:
            alive = -1
        else:
            alive = 0
            slots = self._slots
            for c in candidates:
                s = slots.get(c)
                if s is not None:
                    alive |= 1 << s
            if not alive:
                return {}
        holders = self._holders.get
        spec = self._spec
        if spec:
            self._expire(self._clock())
        out: dict[str, int] = {}
        names = self._names
        i = 0
        if spec:
            sget = spec.get
            for k in keys:
                new = alive & (holders(k, 0) | sget(k, 0))
                if new != alive:
                    if i:
                        self._record(out, names, alive & ~new, i)
                    alive = new
                    if not alive:
                        return out
                i += 1
        else:
            for k in keys:
                new = alive & holders(k, 0)
                if new != alive:
                    if i:
                        self._record(out, names, alive & ~new, i)
                    alive = new
                    if not alive:
                        return out
                i += 1
        if alive > 0:
            self._record(out, names, alive, i)
        return out

    @staticmethod
    def _record(out: dict[str, int], names: list[str | None], mask: int, n: int) -> None:
        while mask:
            low = mask & -mask
            name = names[low.bit_length() - 1]
            if name is not None:
                out[name] = n
            mask ^= low

    def holders(self, key: int) -> set[str]:
        """Endpoints holding ``key`` (events only, no speculation)."""
        return self._mask_names(self._holders.get(key, 0))

    def _mask_names(self, mask: int) -> set[str]:
        out: set[str] = set()
        self_names = self._names
        while mask:
            low = mask & -mask
            name = self_names[low.bit_length() - 1]
            if name is not None:
                out.add(name)
            mask ^= low
        return out

    def held_count(self, endpoint: str) -> int:
        s = self._slots.get(endpoint)
        return 0 if s is None else len(self._lru[s])

    def stats(self) -> IndexStats:
        return IndexStats(
            endpoints=len(self._slots),
            keys=len(self._holders),
            entries=sum(len(lru) for lru in self._lru),
            speculative_entries=self._spec_count,
            evictions=self._evictions,
        )

    def check_invariant(self) -> None:
        """Assert the invariant stated in the module docstring (tests only; O(n))."""
        for k, m in self._holders.items():
            assert m > 0, k
            mm = m
            while mm:
                low = mm & -mm
                assert k in self._lru[low.bit_length() - 1], (k, m)
                mm ^= low
        for s, lru in enumerate(self._lru):
            assert len(lru) <= self._capacity[s] or self._names[s] is None
            for k in lru:
                assert self._holders[k] >> s & 1, (s, k)
            if self._rekey is not None:
                assert {v: k for k, v in self._fwd[s].items()} == self._rev[s]
                assert all(k in lru for k in self._rev[s])
        n = 0
        for s, exp in enumerate(self._spec_exp):
            n += len(exp)
            for k in exp:
                assert self._spec[k] >> s & 1
        for k, m in self._spec.items():
            assert m > 0
            mm = m
            while mm:
                low = mm & -mm
                assert k in self._spec_exp[low.bit_length() - 1]
                mm ^= low
        assert n == self._spec_count
