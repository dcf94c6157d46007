"""The approximate prefix index: hash chain, first-miss matching, LRU bound, purge."""

from __future__ import annotations

import xxhash

from epp.index.approx_prefix import ApproxPrefixIndex, prefix_hashes
from epp.metrics import REGISTRY


def xx(b: bytes) -> int:
    return xxhash.xxh64_intdigest(b)


def test_hash_chain_formula() -> None:
    text = "a" * 8 + "b" * 8 + "cc"
    got = prefix_hashes(text, "m", block_chars=8, max_blocks=10)
    h0 = xx(b"m")
    h1 = xx(b"a" * 8 + h0.to_bytes(8, "little"))
    h2 = xx(b"b" * 8 + h1.to_bytes(8, "little"))
    h3 = xx(b"cc" + h2.to_bytes(8, "little"))  # the final partial block is hashed too
    assert got == [h1, h2, h3]


def test_short_text_truncation_model_and_salt() -> None:
    assert prefix_hashes("abc", "m", block_chars=4, max_blocks=10) == []
    assert len(prefix_hashes("x" * 100, "m", block_chars=4, max_blocks=3)) == 3
    a = prefix_hashes("x" * 16, "m1", block_chars=4, max_blocks=10)
    b = prefix_hashes("x" * 16, "m2", block_chars=4, max_blocks=10)
    c = prefix_hashes("x" * 16, "m1", block_chars=4, max_blocks=10, salt="s")
    assert len(a) == 4 and not set(a) & set(b) and not set(a) & set(c)
    # Chunks are UTF-8 bytes: a 2-byte character counts twice.
    assert len(prefix_hashes("é" * 4, "m", block_chars=4, max_blocks=10)) == 2


def test_injected_hash_function_is_used() -> None:
    calls: list[bytes] = []

    def h(b: bytes) -> int:
        calls.append(b)
        return len(calls)

    assert prefix_hashes("abcdefgh", "m", block_chars=4, max_blocks=5, hash_fn=h) == [2, 3]
    assert calls == [b"m", b"abcd" + (1).to_bytes(8, "little"), b"efgh" + (2).to_bytes(8, "little")]


def test_match_counts_until_first_miss() -> None:
    idx = ApproxPrefixIndex(capacity_per_endpoint=100)
    idx.add("A", [1, 2, 3])
    idx.add("B", [1])
    assert idx.match([1, 2, 3, 4]) == {"A": 3, "B": 1}
    idx2 = ApproxPrefixIndex(capacity_per_endpoint=100)
    idx2.add("A", [1, 3])  # nobody holds 2: the walk stops there
    assert idx2.match([1, 2, 3]) == {"A": 1}
    assert idx2.match([9, 1]) == {}
    idx.check_invariant()


def test_lru_bound_keeps_chain_heads() -> None:
    idx = ApproxPrefixIndex(capacity_per_endpoint=4)
    idx.add("A", list(range(1, 11)))
    assert len(idx) == 4 and idx.blocks_of("A") == 4
    # Leading blocks are the most recent, so the head of the chain survives.
    assert idx.match(list(range(1, 11))) == {"A": 4}
    idx.check_invariant()
    idx.add("A", [100, 101])  # evicts two least recently used (blocks 4 then 3)
    assert idx.match([1, 2, 3, 4]) == {"A": 2}
    assert idx.match([100, 101]) == {"A": 2}
    idx.check_invariant()


def test_recently_used_blocks_survive_eviction() -> None:
    idx = ApproxPrefixIndex(capacity_per_endpoint=3)
    idx.add("A", [1])
    idx.add("A", [2])
    idx.add("A", [3])
    idx.add("A", [1])  # touch 1
    idx.add("A", [4])  # evicts 2, the least recently used
    assert idx.match([1]) == {"A": 1}
    assert idx.match([2]) == {}
    assert idx.match([3]) == {"A": 1}


def test_remove_and_retain_purge_endpoints_and_metrics() -> None:
    idx = ApproxPrefixIndex(capacity_per_endpoint=10, metrics_label="t-purge")
    idx.add("A", [1, 2])
    idx.add("B", [1, 3])
    assert REGISTRY.get_sample_value("llm_d_epp_prefix_indexer_size", {"index": "t-purge"}) == 4
    idx.remove_endpoint("A")
    assert idx.match([1, 2]) == {"B": 1}
    assert len(idx) == 2 and idx.endpoints() == ["B"]
    idx.check_invariant()
    idx.remove_endpoint("nope")  # unknown endpoint: no-op
    idx.retain(["C"])
    assert len(idx) == 0 and idx.match([1]) == {}
    assert REGISTRY.get_sample_value("llm_d_epp_prefix_indexer_size", {"index": "t-purge"}) == 0
    idx.check_invariant()


def test_hit_ratio_is_recorded() -> None:
    idx = ApproxPrefixIndex(metrics_label="t-hit")
    idx.record_hit_ratio(0.5)
    assert (
        REGISTRY.get_sample_value("llm_d_epp_prefix_indexer_hit_ratio_count", {"index": "t-hit"})
        == 1
    )
    assert (
        REGISTRY.get_sample_value("llm_d_epp_prefix_indexer_hit_ratio_sum", {"index": "t-hit"})
        == 0.5
    )


def test_match_equals_naive_count_on_random_indexes() -> None:
    """``match`` counts runs of equal owner sets at once; it must equal counting every
    (block, owner) pair up to the first block nobody holds."""
    import random

    def naive(idx: ApproxPrefixIndex, hashes: list[int]) -> dict[str, int]:
        counts: dict[str, int] = {}
        for h in hashes:
            owners = [e for e in idx.endpoints() if h in idx._lru[e]]
            if not owners:
                break
            for e in owners:
                counts[e] = counts.get(e, 0) + 1
        return counts

    for seed in range(150):
        rng = random.Random(seed)
        idx = ApproxPrefixIndex(capacity_per_endpoint=rng.randint(1, 40))
        chain = list(range(1, 61))
        for _ in range(rng.randint(0, 25)):
            a = rng.randint(0, 59)
            idx.add(f"e{rng.randint(0, 5)}", chain[a : rng.randint(a, 60)])
        query = chain[: rng.randint(0, 60)]
        assert idx.match(query) == naive(idx, query), seed
        idx.check_invariant()


def test_add_keeps_the_exact_lru_order_of_touching_blocks_one_by_one() -> None:
    """``add`` touches an all-held remainder in one pass; the LRU order, owners and
    evictions must equal the plain rule: for each block, last to first, touch it if
    held, else insert it and evict the oldest when over capacity."""
    import random
    from collections import OrderedDict

    def reference_add(
        lru: dict[str, OrderedDict[int, None]], cap: int, endpoint: str, hashes: list[int]
    ) -> None:
        od = lru.setdefault(endpoint, OrderedDict())
        for h in reversed(hashes):
            if h in od:
                od.move_to_end(h)
                continue
            od[h] = None
            if len(od) > cap:
                od.popitem(last=False)

    for seed in range(200):
        rng = random.Random(seed)
        cap = rng.randint(1, 30)
        idx = ApproxPrefixIndex(capacity_per_endpoint=cap)
        ref: dict[str, OrderedDict[int, None]] = {}
        chain = list(range(1, 41))
        for _ in range(rng.randint(1, 30)):
            a = rng.randint(0, 39)
            hashes = chain[a : rng.randint(a, 40)]
            if hashes and rng.random() < 0.2:
                hashes.append(rng.choice(hashes))  # a repeated block
            ep = f"e{rng.randint(0, 3)}"
            idx.add(ep, hashes)
            reference_add(ref, cap, ep, hashes)
            for e, od in ref.items():
                assert list(idx._lru.get(e, {})) == list(od), seed
            idx.check_invariant()


def _reference_hashes(
    text: str, model: str, block_chars: int, max_blocks: int, salt: str
) -> list[int]:
    """The formula, block by block, with no memo."""
    data = text.encode("utf-8", "surrogatepass")[: block_chars * max_blocks]
    if len(data) < block_chars:
        return []
    prev = xx((model + salt).encode())
    out = []
    for i in range(0, len(data), block_chars):
        prev = xx(data[i : i + block_chars] + prev.to_bytes(8, "little"))
        out.append(prev)
    return out


def test_span_memo_returns_exactly_the_formula_for_shared_and_fresh_prefixes() -> None:
    import random

    from epp.index import approx_prefix

    rng = random.Random(5)
    shared = [
        "".join(rng.choice("abcé€ \n") for _ in range(rng.randint(0, 3000))) for _ in range(4)
    ]
    for i in range(300):
        block = rng.choice([1, 4, 7, 64])
        span = block * approx_prefix.SPAN_BLOCKS
        tail_len = rng.choice([0, 1, block - 1, block, span - 1, span, span + 1, 500])
        text = rng.choice(shared) + "".join(rng.choice("xyz€") for _ in range(tail_len))
        model, salt = rng.choice([("m", ""), ("m", "s"), ("other", "")])
        max_blocks = rng.choice([1, 3, 16, 17, 100, 10_000])
        got = prefix_hashes(text, model, block_chars=block, max_blocks=max_blocks, salt=salt)
        assert got == _reference_hashes(text, model, block, max_blocks, salt), i
    assert len(approx_prefix._SPANS) > 0  # the memo was used (and hit: prefixes repeat)


def test_span_memo_is_bounded_by_bytes() -> None:
    from epp.index.approx_prefix import SPAN_BLOCKS, _SpanMemo

    memo = _SpanMemo(limit=8 * SPAN_BLOCKS * 10)  # room for 10 spans of 8-byte blocks
    for i in range(50):
        data = bytes([i]) * (8 * SPAN_BLOCKS * 2)
        first = memo.hashes(data, i, 8)
        again = memo.hashes(data, i, 8)
        assert first == again == _reference_chain(data, i, 8)
        assert memo._bytes <= memo.limit and len(memo) <= 10


def _reference_chain(data: bytes, prev: int, block: int) -> list[int]:
    out = []
    for i in range(0, len(data), block):
        prev = xx(data[i : i + block] + prev.to_bytes(8, "little"))
        out.append(prev)
    return out


def test_random_adds_evictions_and_removals_keep_the_invariant_and_exact_matches() -> None:
    """Interned owner sets: adds (with evictions), endpoint removals and retains in any
    order keep every owner set canonical and reference-counted, and ``match`` equal
    to counting owners block by block."""
    import random

    for seed in range(60):
        rng = random.Random(1000 + seed)
        idx = ApproxPrefixIndex(capacity_per_endpoint=rng.randint(1, 25))
        chains = [list(range(k * 100, k * 100 + 40)) for k in range(3)]
        for _ in range(120):
            op = rng.random()
            ep = f"e{rng.randint(0, 5)}"
            if op < 0.75:
                c = rng.choice(chains)
                a = rng.randint(0, 39)
                idx.add(
                    ep, c[a : rng.randint(a, 40)] if rng.random() < 0.3 else c[: rng.randint(0, 40)]
                )
            elif op < 0.9:
                idx.remove_endpoint(ep)
            else:
                idx.retain(rng.sample([f"e{i}" for i in range(6)], rng.randint(0, 6)))
            idx.check_invariant()
            q = rng.choice(chains)[: rng.randint(0, 40)]
            naive: dict[str, int] = {}
            for h in q:
                holders = [e for e in idx.endpoints() if h in idx._lru[e]]
                if not holders:
                    break
                for e in holders:
                    naive[e] = naive.get(e, 0) + 1
            assert idx.match(q) == naive, seed
