"""Engine scheduling in virtual time: batching, TTFT/ITL, KV limits, leases, LoRA budget."""

from __future__ import annotations

import pytest

from pdroute.protocol.blockhash import chain_block_hashes, to_event_hash
from pdroute.protocol.kv_events import BlockStored
from pdroute.sim.engine import Engine, QueueFull, RemoteSource, ReqState, SimRequest
from pdroute.sim.kvcache import BlockPool
from pdroute.sim.latency import LatencyModel, get_profile
from pdroute.sim.metrics import EngineStats, Histogram

BS = 4


def make_engine(num_blocks: int = 64, max_num_seqs: int = 4, **kw: object) -> Engine:
    prof = get_profile("llama-3.1-8b-h100").with_(jitter=0.0, load_factor=1.0)
    return Engine(
        pool=BlockPool(num_blocks, BS),
        latency=LatencyModel(prof, max_num_seqs),
        stats=EngineStats(),
        max_num_seqs=max_num_seqs,
        **kw,  # type: ignore[arg-type]
    )


def make_req(tokens: list[int], max_tokens: int = 3, **kw: object) -> SimRequest:
    return SimRequest(
        request_id=f"r{id(tokens)}-{len(tokens)}-{max_tokens}",
        prompt_ids=tokens,
        block_hashes=chain_block_hashes(tokens, BS),
        max_tokens=max_tokens,
        **kw,  # type: ignore[arg-type]
    )


def run(engine: Engine, now: float = 0.0, limit: int = 1000) -> float:
    """Drive the engine until idle in virtual time; returns the final time."""
    for _ in range(limit):
        dur = engine.schedule(now)
        if dur is None:
            return now
        now += dur
        engine.complete_step(now)
    raise AssertionError("engine did not go idle")


def test_single_request_ttft_and_itl_follow_the_model() -> None:
    e = make_engine()
    r = make_req(list(range(10)), max_tokens=3)
    e.add(r, 0.0)
    end = run(e)
    assert r.finished and r.finish_reason == "length" and len(r.output_ids) == 3
    ttft = 0.030 + 10 * 0.00025
    assert r.t_first_token == pytest.approx(ttft)
    assert end == pytest.approx(ttft + 2 * 0.012)
    assert e.stats.h_ttft.count == 1
    assert e.stats.h_itl.count == 2 and e.stats.h_itl.sum == pytest.approx(0.024)
    assert e.pool.usage() == 0.0


def test_max_num_seqs_limits_running_and_rest_wait() -> None:
    e = make_engine(max_num_seqs=2)
    reqs = [make_req([i] * 5, max_tokens=4) for i in range(5)]
    for r in reqs:
        e.add(r, 0.0)
    e.schedule(0.0)
    assert len(e.running) == 2 and len(e.waiting) == 3
    run(e)
    assert all(r.finished for r in reqs)
    # FCFS: the first two start first
    assert reqs[0].t_scheduled == reqs[1].t_scheduled == 0.0
    assert reqs[2].t_scheduled > 0.0


def test_prefix_hits_skip_compute_but_not_the_last_token() -> None:
    e = make_engine()
    prompt = list(range(12))  # 3 full blocks
    a = make_req(prompt, max_tokens=1)
    e.add(a, 0.0)
    t = run(e)
    b = make_req(list(prompt), max_tokens=1)
    e.add(b, t)
    run(e, t)
    # vLLM never counts the last token as a hit: only blocks within the first 11 tokens.
    assert b.num_cached_tokens == 8
    assert e.stats.prefix_cache_hits == 8
    assert e.stats.prefix_cache_queries == 24
    assert e.stats.prompt_by_source["local_cache_hit"] == 8
    assert e.stats.prompt_by_source["local_compute"] == 12 + 4


def test_requests_wait_for_kv_blocks() -> None:
    e = make_engine(num_blocks=4, max_num_seqs=8)
    a = make_req(list(range(8)), max_tokens=8)  # needs 4 blocks
    b = make_req(list(range(100, 104)), max_tokens=1)
    e.add(a, 0.0)
    e.add(b, 0.0)
    e.schedule(0.0)
    assert e.running == [a] and list(e.waiting) == [b]
    run(e)
    assert b.finished and b.t_scheduled >= a.t_finished


def test_request_larger_than_cache_is_rejected_and_queue_bounded() -> None:
    e = make_engine(num_blocks=2, max_waiting=1)
    with pytest.raises(ValueError, match="KV blocks"):
        e.add(make_req(list(range(20)), max_tokens=1), 0.0)
    e.add(make_req([1], max_tokens=1), 0.0)
    with pytest.raises(QueueFull):
        e.add(make_req([2], max_tokens=1), 0.0)
    assert e.stats.admission_rejections == 1


def test_itl_grows_with_running_batch() -> None:
    prof = get_profile("llama-3.1-8b-h100").with_(jitter=0.0, load_factor=3.0)
    e = Engine(
        pool=BlockPool(256, BS), latency=LatencyModel(prof, 5), stats=EngineStats(), max_num_seqs=5
    )
    solo = make_req([1, 2], max_tokens=3)
    e.add(solo, 0.0)
    run(e)
    solo_itl = (solo.t_finished - solo.t_first_token) / 2
    batch = [make_req([i, i + 1], max_tokens=3) for i in range(10, 15)]
    for r in batch:
        e.add(r, 10.0)
    run(e, 10.0)
    batch_itl = (batch[0].t_finished - batch[0].t_first_token) / 2
    assert solo_itl == pytest.approx(0.012)
    assert batch_itl == pytest.approx(0.036)


def test_remote_decode_holds_blocks_until_released_or_expired() -> None:
    e = make_engine(lease_seconds=5.0)
    r = make_req(list(range(8)), max_tokens=1, remote_decode=True)
    e.add(r, 0.0)
    t = run(e)
    assert r.lease_id == r.request_id and r.lease_id in e.leases
    assert e.pool.usage() > 0.0
    assert e.next_deadline() == pytest.approx(t + 5.0)
    assert e.release_lease(r.request_id)
    assert e.pool.usage() == 0.0
    assert not e.release_lease(r.request_id)
    assert e.stats.nixl.notifications_after_expiry == 1

    r2 = make_req(list(range(50, 58)), max_tokens=1, remote_decode=True)
    e.add(r2, t)
    t2 = run(e, t)
    e.schedule(t2 + 5.1)
    assert not e.leases and e.pool.usage() == 0.0
    assert e.stats.nixl.kv_expired_reqs == 1


def test_remote_prefill_loads_then_decodes_with_external_tokens() -> None:
    started: list[SimRequest] = []
    e = make_engine(on_load=started.append)
    src = RemoteSource("eng", "rid", "127.0.0.1", 1, [0, 1], 8)
    r = make_req(list(range(8)), max_tokens=2, remote_source=src)
    e.add(r, 0.0)
    assert e.schedule(0.0) is None  # loading does not occupy a running slot
    assert started == [r] and r.state is ReqState.LOADING
    e.load_finished(r, None, 0.5)
    run(e, 0.5)
    assert r.finished and len(r.output_ids) == 2
    assert r.num_external_tokens == 8
    assert e.stats.prompt_by_source["external_kv_transfer"] == 8
    assert e.stats.prompt_by_source["local_compute"] == 0
    # Same prompt -> same generated tokens as a non-disaggregated run.
    plain = make_req(list(range(8)), max_tokens=2)
    plain.seed = r.seed
    e.add(plain, 1.0)
    run(e, 1.0)
    assert plain.output_ids == r.output_ids


def test_failed_load_finishes_with_error_and_frees_blocks() -> None:
    e = make_engine(on_load=lambda r: None)
    src = RemoteSource("eng", "rid", "127.0.0.1", 1, [0], 4)
    r = make_req(list(range(4)), max_tokens=2, remote_source=src)
    e.add(r, 0.0)
    e.schedule(0.0)
    e.load_finished(r, "handshake_failed", 1.0)
    assert r.finished and r.finish_reason == "error" and r.error == "handshake_failed"
    assert e.pool.usage() == 0.0
    assert e.stats.success["error"] == 1


def test_lora_budget_defers_other_adapters() -> None:
    e = make_engine(max_num_seqs=8, max_loras=1)
    a = make_req([1, 2], max_tokens=3, lora_name="a")
    b = make_req([3, 4], max_tokens=1, lora_name="b")
    c = make_req([5, 6], max_tokens=1)
    for r in (a, b, c):
        e.add(r, 0.0)
    e.schedule(0.0)
    assert e.running == [a]
    run(e)
    assert b.t_scheduled >= a.t_finished


def test_abort_frees_everything() -> None:
    e = make_engine()
    r = make_req(list(range(8)), max_tokens=50)
    e.add(r, 0.0)
    e.schedule(0.0)
    e.abort(r, 0.1)
    assert r.finish_reason == "abort" and not e.running and e.pool.usage() == 0.0


def test_stop_after_finishes_with_stop() -> None:
    e = make_engine()
    r = make_req([1, 2, 3], max_tokens=100, stop_after=4)
    e.add(r, 0.0)
    run(e)
    assert r.finish_reason == "stop" and len(r.output_ids) == 4
    assert e.stats.success["stop"] == 1


def test_kv_blocks_are_allocated_step_by_step() -> None:
    e = make_engine(num_blocks=100)
    r = make_req(list(range(6)), max_tokens=20)
    e.add(r, 0.0)
    e.schedule(0.0)
    assert len(r.block_ids) == 2  # 6 prompt tokens + the first output token
    t = 0.0
    usages = []
    while not r.finished:
        t += 0.01
        e.complete_step(t)
        usages.append(e.pool.usage())
        if e.schedule(t) is None:
            break
    assert usages == [*sorted(usages[:-1]), 0.0]  # grows, then all freed
    assert max(usages) == pytest.approx(7 / 100)  # ceil((6 + 20) / 4) blocks at most


def test_preemption_recomputes_and_finishes_identically() -> None:
    # 6 blocks of 4 tokens; two requests that each grow to 5 blocks cannot both fit.
    e = make_engine(num_blocks=6, max_num_seqs=2)
    a = make_req([1, 2, 3], max_tokens=17)
    b = make_req([7, 8, 9], max_tokens=17)
    e.add(a, 0.0)
    e.add(b, 0.0)
    run(e)
    assert a.finished and b.finished
    assert len(a.output_ids) == len(b.output_ids) == 17
    assert e.stats.preemptions >= 1
    assert b.num_preemptions >= 1 and a.num_preemptions == 0  # the later request yields
    assert e.pool.usage() == 0.0
    # Same tokens as an undisturbed run of the same prompt.
    solo = make_engine(num_blocks=64)
    c = make_req([7, 8, 9], max_tokens=17)
    c.seed = b.seed
    solo.add(c, 0.0)
    run(solo)
    assert c.output_ids == b.output_ids
    assert e.stats.h_preemptions.sum >= 1


def test_generated_blocks_are_cached_and_hit_by_the_next_turn() -> None:
    events: list[object] = []
    e = make_engine(num_blocks=64, on_events=events.extend)
    prompt = list(range(100, 106))  # 1 full block + 2 tokens
    first = make_req(prompt, max_tokens=11)
    e.add(first, 0.0)
    t = run(e)
    seq = [*prompt, *first.output_ids]  # 17 tokens; KV computed for 16 = 4 blocks
    assert len(first.generated_hashes) == 3
    assert [*first.block_hashes, *first.generated_hashes] == chain_block_hashes(seq, BS)[:4]
    stored = [h for ev in events if isinstance(ev, BlockStored) for h in ev.block_hashes]
    assert stored == [to_event_hash(h) for h in chain_block_hashes(seq, BS)[:4]]
    # The next turn's prompt extends the conversation: all 4 blocks are prefix hits.
    nxt = make_req([*seq, 7, 7, 7], max_tokens=1)
    e.add(nxt, t)
    run(e, t)
    assert nxt.num_cached_tokens == 16


def test_histogram_observations_are_folded_as_tokens_flow() -> None:
    e = make_engine(num_blocks=2048, max_num_seqs=4)
    reqs = [make_req([i] * 5, max_tokens=1500) for i in range(4)]
    for r in reqs:
        e.add(r, 0.0)
    run(e, limit=2000)
    assert len(e.stats.h_itl._pending) <= Histogram.FOLD_AT + 4
    assert e.stats.h_itl.count == 4 * 1499  # nothing lost by folding
    assert e.stats.generation_tokens == 4 * 1500
