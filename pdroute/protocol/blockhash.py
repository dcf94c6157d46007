"""vLLM's prefix-cache block hashes, computed the way vLLM v1 computes them.

Invariant: ``chain_block_hashes(tokens, ...)`` returns, for every *full* block of
``block_size`` tokens, the same 32-byte digest vLLM's ``hash_block_tokens`` gives,
chained from ``NONE_HASH`` (or from the seed-derived root when PYTHONHASHSEED is
set). KV events publish ``to_event_hash(digest)`` (the low 64 bits, big-endian).

``pickle.dumps`` is used only because vLLM's default ``sha256`` algorithm hashes a
pickled tuple; nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import pickle
from collections.abc import Callable, Sequence
from typing import Any

import cbor2

HashFn = Callable[[Any], bytes]

_MASK64 = (1 << 64) - 1


def sha256_pickle(obj: Any) -> bytes:
    """vLLM ``sha256``: sha256 over ``pickle.dumps(obj, protocol=5)``."""
    return hashlib.sha256(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)).digest()


def sha256_cbor(obj: Any) -> bytes:
    """vLLM ``sha256_cbor``: sha256 over canonical CBOR (language independent)."""
    return hashlib.sha256(cbor2.dumps(obj, canonical=True)).digest()


HASH_FUNCTIONS: dict[str, HashFn] = {"sha256": sha256_pickle, "sha256_cbor": sha256_cbor}


def hash_function(name: str) -> HashFn:
    """Look up a hash by vLLM's ``--prefix-caching-hash-algo`` name."""
    try:
        return HASH_FUNCTIONS[name]
    except KeyError:
        raise ValueError(
            f"unknown prefix_caching_hash_algo {name!r}; known: {sorted(HASH_FUNCTIONS)}"
        ) from None


def none_hash(hash_fn: HashFn, seed: str | None = None) -> bytes:
    """Root parent hash: vLLM hashes a fixed string unless PYTHONHASHSEED is set."""
    return hash_fn(seed if seed is not None else "vllm-none-hash")


def hash_block(
    hash_fn: HashFn, parent: bytes, block_tokens: Sequence[int], extra_keys: tuple[Any, ...] | None
) -> bytes:
    return hash_fn((parent, tuple(block_tokens), extra_keys))


def chain_block_hashes(
    tokens: Sequence[int],
    block_size: int,
    hash_fn: HashFn = sha256_pickle,
    *,
    seed: str | None = None,
    extra_keys: tuple[Any, ...] | None = None,
    parent: bytes | None = None,
) -> list[bytes]:
    """Digests of every full block of ``tokens``; a trailing partial block is not hashed."""
    if block_size <= 0:
        raise ValueError("block_size must be positive")
    prev = parent if parent is not None else none_hash(hash_fn, seed)
    out: list[bytes] = []
    for start in range(0, len(tokens) - block_size + 1, block_size):
        prev = hash_block(hash_fn, prev, tokens[start : start + block_size], extra_keys)
        out.append(prev)
    return out


def to_event_hash(digest: bytes) -> int:
    """The 64-bit integer vLLM publishes in KV events for a block digest."""
    return int.from_bytes(digest, "big") & _MASK64
