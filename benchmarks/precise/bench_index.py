"""Cost of the precise KV-block index: ingest rate, lookup latency, memory.

Prints one JSON document and a readable table. Timings are best-of-N thread CPU
time on one core (the EPP's event loop); nothing is asserted.

    .venv/bin/python benchmarks/precise/bench_index.py [--quick] [--json-out FILE]

* ingest: vLLM-0.32-encoded EventBatch payloads (msgpack, BlockStored with 16
  token ids per block, some BlockRemoved), decoded with the typed structs and
  applied by ``KVEventIngestor.apply``; events/s and blocks/s per core.
* lookup: ``KVBlockIndex.match`` for a 100k-token prompt (block size 16 ->
  6250 keys) against 8 endpoints holding different prefix lengths; plus the
  request-side key computation (vLLM sha256 cold / memoized, xxh3 re-key keyer).
* memory: tracemalloc bytes per stored (block, endpoint) entry at 1M entries.
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import msgspec

from epp.datalayer.kvevents import KVEventIngestor
from epp.datalayer.tokenizer import EngineKeyer, FastKeyer
from epp.index.kvblock import KVBlockIndex
from pdroute.protocol.kv_events import (
    BlockHash,
    BlockRemoved,
    BlockStored,
    EventBatch,
    KVEvent,
    encode_payload,
)

#: CPU time of this thread: the cost per core, independent of other processes
#: competing for the machine (wall-clock timings on a shared box mislead).
_now = time.thread_time


def _best(fn: Callable[[], float], reps: int) -> float:
    return min(fn() for _ in range(reps))


def bench_ingest(
    events_per_batch: int, blocks_per_event: int, total: int, reps: int
) -> dict[str, float]:
    rng = random.Random(events_per_batch * 1000 + blocks_per_event)
    payloads = []
    n_batches = max(1, total // events_per_batch)
    for _ in range(n_batches):
        evs: list[KVEvent] = []
        for j in range(events_per_batch):
            hs: list[BlockHash] = [rng.getrandbits(64) for _ in range(blocks_per_event)]
            if j % 8 == 7:  # about one removal per 8 events, like a warm cache
                evs.append(BlockRemoved(block_hashes=hs, medium="GPU"))
            else:
                evs.append(
                    BlockStored(
                        block_hashes=hs,
                        parent_block_hash=rng.getrandbits(64),
                        token_ids=[rng.randrange(32000) for _ in range(16 * blocks_per_event)],
                        block_size=16,
                        lora_id=None,
                        medium="GPU",
                        lora_name=None,
                    )
                )
        payloads.append(encode_payload(EventBatch(ts=1.0, events=evs, data_parallel_rank=0)))
    n_events = n_batches * events_per_batch

    def run() -> float:
        index = KVBlockIndex(capacity_per_endpoint=1 << 22)
        ing = KVEventIngestor(index)
        apply = ing.apply
        t0 = _now()
        for i, p in enumerate(payloads):
            apply("10.0.0.1:8000" if i & 1 else "10.0.0.2:8000", p)
        ing.flush_metrics()
        return _now() - t0

    dt = _best(run, reps)
    return {
        "events_per_batch": events_per_batch,
        "blocks_per_event": blocks_per_event,
        "events_per_s": n_events / dt,
        "blocks_per_s": n_events * blocks_per_event / dt,
        "payload_bytes_avg": statistics.mean(len(p) for p in payloads),
    }


def bench_lookup(prompt_tokens: int, block_size: int, reps: int) -> dict[str, float]:
    rng = random.Random(5)
    tokens = [rng.randrange(32000) for _ in range(prompt_tokens)]
    fast = FastKeyer(block_size)
    keys = fast.keys(tokens)
    index = KVBlockIndex(capacity_per_endpoint=1 << 20)
    # 8 endpoints hold 100%, 90%, ..., 30% of the prefix; unrelated blocks too.
    for e in range(8):
        s = index.slot(f"10.0.0.{e}:8000")
        index.store(s, keys[: len(keys) * (10 - e) // 10])
        index.store(s, (rng.getrandbits(64) for _ in range(20000)))

    def t_match() -> float:
        t0 = _now()
        m = index.match(keys)
        dt = _now() - t0
        assert len(m) == 8
        return dt

    def t_match_spec() -> float:
        index.speculate("10.0.0.7:8000", keys[:100], ttl_s=3600)
        t0 = _now()
        index.match(keys)
        return _now() - t0

    def t_engine_cold() -> float:
        k = EngineKeyer(block_size, "sha256")
        t0 = _now()
        k.keys(tokens)
        return _now() - t0

    warm = EngineKeyer(block_size, "sha256")
    warm.keys(tokens)

    def t_engine_warm() -> float:
        t0 = _now()
        warm.keys(tokens)
        return _now() - t0

    def t_engine_cbor_cold() -> float:
        k = EngineKeyer(block_size, "sha256_cbor")
        t0 = _now()
        k.keys(tokens)
        return _now() - t0

    def t_fast() -> float:
        t0 = _now()
        fast.keys(tokens)
        return _now() - t0

    return {
        "prompt_tokens": prompt_tokens,
        "block_size": block_size,
        "blocks": len(keys),
        "match_us": _best(t_match, reps) * 1e6,
        "match_with_speculation_us": _best(t_match_spec, reps) * 1e6,
        "keys_vllm_sha256_cold_us": _best(t_engine_cold, max(1, reps // 3)) * 1e6,
        "keys_vllm_sha256_cbor_cold_us": _best(t_engine_cbor_cold, max(1, reps // 3)) * 1e6,
        "keys_vllm_sha256_memoized_us": _best(t_engine_warm, reps) * 1e6,
        "keys_xxh3_rekey_us": _best(t_fast, reps) * 1e6,
    }


def bench_memory(entries: int, endpoints: int, overlap: float) -> dict[str, float]:
    """Bytes per (block, endpoint) entry; ``overlap`` = share of blocks every
    endpoint also holds (a shared system prompt)."""
    rng = random.Random(9)
    per = entries // endpoints
    shared = [rng.getrandbits(64) for _ in range(int(per * overlap))]
    own = [[rng.getrandbits(64) for _ in range(per - len(shared))] for _ in range(endpoints)]
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    index = KVBlockIndex(capacity_per_endpoint=per + 1)
    for e in range(endpoints):
        s = index.slot(f"10.0.0.{e}:8000")
        index.store(s, shared)
        index.store(s, own[e])
    used = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    st = index.stats()
    return {
        "entries": st.entries,
        "keys": st.keys,
        "endpoints": endpoints,
        "overlap": overlap,
        "bytes_total": used,
        "bytes_per_entry": used / st.entries,
        "mib_per_million_entries": used / st.entries * 1e6 / 2**20,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller sizes (CI smoke)")
    ap.add_argument("--json-out", type=Path)
    args = ap.parse_args()
    reps = 3 if args.quick else 7
    total = 20_000 if args.quick else 200_000
    result: dict[str, object] = {
        "python": sys.version.split()[0],
        "ingest": [
            bench_ingest(epb, bpe, total, reps)
            for epb, bpe in ((1, 1), (8, 1), (32, 1), (256, 1), (32, 4))
        ],
        "lookup": [bench_lookup(100_000, bs, reps) for bs in (16, 128)],
        "memory": [
            bench_memory(200_000 if args.quick else 1_000_000, n, ov)
            for n, ov in ((1, 0.0), (4, 0.0), (4, 0.5))
        ],
    }
    doc = msgspec.json.format(msgspec.json.encode(result), indent=2)
    sys.stdout.write(doc.decode() + "\n")
    if args.json_out:
        args.json_out.write_bytes(doc)
    print("\ningest (decode + apply, one core)")
    print(f"{'events/batch':>12} {'blocks/event':>12} {'events/s':>12} {'blocks/s':>12}")
    for r in result["ingest"]:  # type: ignore[attr-defined]
        print(
            f"{r['events_per_batch']:>12} {r['blocks_per_event']:>12} "
            f"{r['events_per_s']:>12,.0f} {r['blocks_per_s']:>12,.0f}"
        )
    print("\nlookup for a 100k-token prompt (microseconds)")
    for r in result["lookup"]:  # type: ignore[attr-defined]
        print(
            f"  block {r['block_size']:>3} ({r['blocks']} blocks): match {r['match_us']:,.0f}"
            f" | +speculation {r['match_with_speculation_us']:,.0f}"
            f" | keys sha256 cold {r['keys_vllm_sha256_cold_us']:,.0f}"
            f" / cbor cold {r['keys_vllm_sha256_cbor_cold_us']:,.0f}"
            f" / memoized {r['keys_vllm_sha256_memoized_us']:,.0f}"
            f" / xxh3 {r['keys_xxh3_rekey_us']:,.0f}"
        )
    print("\nmemory")
    for r in result["memory"]:  # type: ignore[attr-defined]
        print(
            f"  {r['entries']:,} entries on {r['endpoints']} endpoint(s), overlap {r['overlap']}:"
            f" {r['bytes_per_entry']:.0f} B/entry = {r['mib_per_million_entries']:.0f} MiB per 1M"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
