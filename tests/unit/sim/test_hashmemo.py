"""The block-hash memo returns exactly what the hash function returns, with bounded memory."""

from __future__ import annotations

from typing import Any

import pytest

from pdroute.protocol.blockhash import chain_block_hashes, sha256_cbor, sha256_pickle
from pdroute.sim.hashmemo import MemoHash, memo_hash


@pytest.mark.parametrize("fn", [sha256_pickle, sha256_cbor])
def test_memo_is_transparent_for_chained_hashes(fn: Any) -> None:
    memo = MemoHash(fn, size=4)
    tokens = list(range(200))
    want = chain_block_hashes(tokens, 16, fn, extra_keys=("lora",))
    assert chain_block_hashes(tokens, 16, memo, extra_keys=("lora",)) == want
    assert chain_block_hashes(tokens, 16, memo, extra_keys=("lora",)) == want  # from the memo


def test_memo_calls_the_function_once_per_input_and_stays_bounded() -> None:
    calls: list[Any] = []

    def fn(obj: Any) -> bytes:
        calls.append(obj)
        return sha256_pickle(obj)

    memo = MemoHash(fn, size=3)
    for _ in range(3):
        for i in range(3):
            assert memo((b"p", (i,), None)) == sha256_pickle((b"p", (i,), None))
    assert len(calls) == 3
    for i in range(3, 20):
        memo((b"p", (i,), None))
    assert len(memo.young) <= 3 and len(memo.old) <= 3
    # a recently used input survives one generation change (promoted from old)
    memo((b"p", (19,), None))
    assert calls.count((b"p", (19,), None)) == 1


def test_unhashable_input_is_hashed_without_memo() -> None:
    memo = MemoHash(sha256_pickle)
    obj = (b"p", [1, 2], None)
    assert memo(obj) == sha256_pickle(obj)
    assert not memo.young


def test_memo_is_shared_per_function() -> None:
    assert memo_hash(sha256_pickle) is memo_hash(sha256_pickle)
    assert memo_hash(sha256_pickle) is not memo_hash(sha256_cbor)
