"""Profile runner, scheduler loop, prefix learning, and P/D disaggregation decisions."""

from __future__ import annotations

import random
from types import MappingProxyType

import pytest

from epp.config import (
    GIE_DEFAULT_PATH,
    PD_EXAMPLE_PATH,
    load_config,
    load_config_text,
    load_default_config,
)
from epp.datastore import Datastore, Endpoint, EndpointMetrics
from epp.errors import NoReadyEndpoint
from epp.index.approx_prefix import prefix_hashes
from epp.metrics import REGISTRY
from epp.scheduling import CycleState, LLMRequest, Pipeline, build_pipeline

HEAD = "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\n"
NOW = 100.0


def make_store(roles: list[str | None], waiting: list[int] | None = None) -> Datastore:
    ds = Datastore(clock=lambda: NOW)
    eps = []
    for i, role in enumerate(roles):
        labels = {} if role is None else {"llm-d.ai/role": role}
        eps.append(Endpoint(f"pod{i}", f"10.0.0.{i}", 8000, labels=MappingProxyType(labels)))
    ds.replace_endpoints(eps)
    for i, e in enumerate(eps):
        ds.update_metrics(
            e.key, EndpointMetrics(waiting=(waiting or [0] * len(eps))[i], updated_at=NOW)
        )
    return ds


def run(
    pipe: Pipeline, ds: Datastore, prompt: str, *, rid: str = "r"
) -> tuple[dict[str, list[str]], dict[str, str]]:
    req = LLMRequest(rid, "model-a", prompt=prompt)
    result, cycle = pipe.scheduler.schedule(req, list(ds.snapshot().endpoints))
    headers: dict[str, str] = {}
    for hook in pipe.pre_request:
        hook.pre_request(cycle, req, result, headers)
    out = {
        name: [t.key for t in r.targets]
        for name, r in result.profile_results.items()
        if r is not None
    }
    assert result.primary_profile in out
    return out, headers


def counter(decision: str, reason: str) -> float:
    return (
        REGISTRY.get_sample_value(
            "llm_d_epp_disagg_decision_total", {"decision": decision, "reason": reason}
        )
        or 0.0
    )


def test_default_config_keeps_a_prefix_until_its_holder_queue_is_long() -> None:
    ds = make_store([None, None, None])
    pipe = build_pipeline(load_default_config(), datastore=ds, rng=random.Random(0))
    prompt = "You are a helpful assistant. " * 40
    holder, fallback = run(pipe, ds, prompt)[0]["default"]
    assert fallback != holder  # maxNumOfEndpoints 2: one fallback for the proxy
    for i in range(3):  # hits stay: the holder is now the busiest by routed load
        assert run(pipe, ds, prompt + f" question {i}?")[0]["default"][0] == holder
    # A queue of 8 on the holder (none elsewhere) is not enough to give up the cache...
    ds.update_metrics(holder, EndpointMetrics(waiting=8, updated_at=NOW))
    assert run(pipe, ds, prompt + " q8?")[0]["default"][0] == holder
    # ...a queue at the load-aware threshold (16) with a fuller KV cache is.
    ds.update_metrics(holder, EndpointMetrics(waiting=16, kv_cache_usage=0.5, updated_at=NOW))
    assert run(pipe, ds, prompt + " q16?")[0]["default"][0] != holder


def test_default_config_places_new_prefixes_away_from_recent_traffic() -> None:
    ds = make_store([None, None, None])
    pipe = build_pipeline(load_default_config(), datastore=ds, rng=random.Random(0))
    hot = "hot system prompt " * 40
    x = run(pipe, ds, hot)[0]["default"][0]
    for i in range(5):
        assert run(pipe, ds, hot + f" {i}")[0]["default"][0] == x
    # Two new prefixes: the two endpoints that never got one (no-hit-lru) and got
    # no traffic (routed-load).
    y = run(pipe, ds, "second prompt " * 40)[0]["default"][0]
    z = run(pipe, ds, "third prompt " * 40)[0]["default"][0]
    assert len({x, y, z}) == 3
    # The next new prefix: x is the least recently used for a new prefix (no-hit-lru
    # alone would pick it), but it took six times the traffic: routed-load wins.
    assert run(pipe, ds, "fourth prompt " * 40)[0]["default"][0] == y


def test_gie_default_config_prefers_short_queue_then_prefix_affinity() -> None:
    ds = make_store([None, None, None], waiting=[4, 0, 4])
    pipe = build_pipeline(load_config(GIE_DEFAULT_PATH), datastore=ds, rng=random.Random(0))
    prompt = "You are a helpful assistant. " * 40
    out, headers = run(pipe, ds, prompt)
    assert out == {"default": ["10.0.0.1:8000"]} and headers == {}
    # Same queue everywhere now: the prefix learned on pod1 (weight 3) wins.
    for e in ds.endpoints():
        ds.update_metrics(e.key, EndpointMetrics(waiting=1, updated_at=NOW))
    for _ in range(5):
        out, _ = run(pipe, ds, prompt + " question?")
        assert out == {"default": ["10.0.0.1:8000"]}


def test_weighted_sum_decides_between_scorers() -> None:
    # queue w1 vs prefix w3: a full prefix hit (3) beats the emptiest queue (1).
    cfg = load_config_text(
        HEAD
        + "plugins:\n- type: queue-scorer\n- type: prefix-cache-scorer\nschedulingProfiles:\n- name: d\n"
        "  plugins: [{pluginRef: queue-scorer, weight: 1}, {pluginRef: prefix-cache-scorer, weight: 3}]\n"
    )
    ds = make_store([None, None], waiting=[0, 0])
    pipe = build_pipeline(cfg, datastore=ds, rng=random.Random(0))
    prompt = "z" * 1000
    first, _ = run(pipe, ds, prompt)
    holder = first["d"][0]
    other = next(e.key for e in ds.endpoints() if e.key != holder)
    ds.update_metrics(holder, EndpointMetrics(waiting=9, updated_at=NOW))
    ds.update_metrics(other, EndpointMetrics(waiting=0, updated_at=NOW))
    assert run(pipe, ds, prompt)[0] == {"d": [holder]}  # 0 + 3*1.0 > 1*1.0 + 0
    # With prefix weight 0.5 the queue wins instead.
    cfg2 = load_config_text(
        HEAD
        + "plugins:\n- type: queue-scorer\n- type: prefix-cache-scorer\nschedulingProfiles:\n- name: d\n"
        "  plugins: [{pluginRef: queue-scorer, weight: 1}, {pluginRef: prefix-cache-scorer, weight: 0.5}]\n"
    )
    pipe2 = build_pipeline(cfg2, datastore=ds, rng=random.Random(0))
    producer2 = pipe2.plugins["approx-prefix-cache-producer"]
    hashes = prefix_hashes(prompt, "model-a", block_chars=64, max_blocks=256)
    producer2.index.add(holder, hashes)  # type: ignore[attr-defined]
    assert producer2.index.match(hashes) == {holder: len(hashes)}  # type: ignore[attr-defined]
    assert run(pipe2, ds, prompt)[0] == {"d": [other]}


def test_filters_run_in_order_and_stop_early() -> None:
    cfg = load_config_text(
        HEAD + "plugins:\n- type: prefill-filter\n- type: label-selector-filter\n"
        "  parameters: {matchLabels: {zone: a}}\n"
    )
    ds = make_store([None, None])
    pipe = build_pipeline(cfg, datastore=ds, rng=random.Random(0))
    label_filter = pipe.plugins["label-selector-filter"]
    calls = []
    orig = label_filter.filter  # type: ignore[attr-defined]
    label_filter.filter = lambda *a: calls.append(1) or orig(*a)  # type: ignore[attr-defined]
    before = (
        REGISTRY.get_sample_value("llm_d_epp_scheduler_attempts_total", {"status": "failure"}) or 0
    )
    with pytest.raises(NoReadyEndpoint) as ei:
        run(pipe, ds, "hi")
    assert calls == []  # the second filter never ran
    assert ei.value.status == 503
    assert "profile 'default'" in ei.value.message
    assert "filter 'prefill-filter' removed all 2 candidates" in ei.value.message
    assert (
        REGISTRY.get_sample_value("llm_d_epp_scheduler_attempts_total", {"status": "failure"})
        == before + 1
    )


def test_scheduler_records_latency_metrics() -> None:
    ds = make_store([None, None])
    pipe = build_pipeline(load_config(GIE_DEFAULT_PATH), datastore=ds, rng=random.Random(0))
    labels = {
        "extension_point": "Scorer",
        "plugin_type": "queue-scorer",
        "plugin_name": "queue-scorer",
    }
    n0 = REGISTRY.get_sample_value("llm_d_epp_plugin_duration_seconds_count", labels) or 0
    s0 = REGISTRY.get_sample_value("llm_d_epp_scheduler_e2e_duration_seconds_count") or 0
    run(pipe, ds, "hello")
    assert REGISTRY.get_sample_value("llm_d_epp_plugin_duration_seconds_count", labels) == n0 + 1
    assert REGISTRY.get_sample_value("llm_d_epp_scheduler_e2e_duration_seconds_count") == s0 + 1


# ----------------------------------------------------------------------- P/D

PD_ROLES: list[str | None] = ["decode", "decode", "prefill", "prefill"]


def pd_pipeline(ds: Datastore, config_text: str | None = None) -> Pipeline:
    cfg = load_config(PD_EXAMPLE_PATH) if config_text is None else load_config_text(config_text)
    return build_pipeline(cfg, datastore=ds, rng=random.Random(0))


def test_short_prompt_is_not_disaggregated() -> None:
    ds = make_store(PD_ROLES)
    pipe = pd_pipeline(ds)
    before = counter("decode-only", "short-prompt")
    out, headers = run(pipe, ds, "x" * 40)  # 10 tokens < nonCachedTokens 16
    assert set(out) == {"decode"} and out["decode"][0] in ("10.0.0.0:8000", "10.0.0.1:8000")
    assert headers == {}
    assert counter("decode-only", "short-prompt") == before + 1


def test_long_prompt_is_disaggregated_and_header_set() -> None:
    ds = make_store(PD_ROLES)
    pipe = pd_pipeline(ds)
    before = counter("prefill-decode", "uncached-prefix")
    out, headers = run(pipe, ds, "y" * 400)  # 100 tokens, nothing cached
    assert out["decode"][0] in ("10.0.0.0:8000", "10.0.0.1:8000")
    assert out["prefill"][0] in ("10.0.0.2:8000", "10.0.0.3:8000")
    assert headers == {"x-prefiller-host-port": out["prefill"][0]}
    assert counter("prefill-decode", "uncached-prefix") == before + 1


def test_cached_prefix_on_decode_lowers_uncached_count() -> None:
    ds = make_store(PD_ROLES)
    pipe = pd_pipeline(ds)
    base = "w" * 640  # 10 blocks of 64 chars = 160 tokens
    first, _ = run(pipe, ds, base)
    assert "prefill" in first
    # The same prefix plus 40 chars (10 tokens) lands on the same decode endpoint,
    # where only 10 tokens are uncached (< 16): no prefill this time.
    before = counter("decode-only", "cached")
    out, headers = run(pipe, ds, base + "q" * 40)
    assert out["decode"] == first["decode"]
    assert set(out) == {"decode"} and headers == {}
    assert counter("decode-only", "cached") == before + 1
    # A longer new suffix (25 uncached tokens) disaggregates again.
    out, headers = run(pipe, ds, base + "n" * 100)
    assert "prefill" in out and headers["x-prefiller-host-port"] == out["prefill"][0]


def test_prefix_learning_credits_decode_and_prefill_and_purges_on_removal() -> None:
    ds = make_store(PD_ROLES)
    pipe = pd_pipeline(ds)
    out, _ = run(pipe, ds, "v" * 640)
    index = pipe.plugins["approx-prefix-cache-producer"].index  # type: ignore[attr-defined]
    assert sorted(index.endpoints()) == sorted([out["decode"][0], out["prefill"][0]])
    assert index.blocks_of(out["decode"][0]) == 10
    keep = [e for e in ds.endpoints() if e.key != out["decode"][0]]
    ds.replace_endpoints(keep)  # the decode endpoint leaves the pool
    assert index.endpoints() == [out["prefill"][0]]
    index.check_invariant()


def test_prompt_tokens_minimum_and_token_count_override() -> None:
    ds = make_store(PD_ROLES)
    text = HEAD + (
        "plugins:\n- type: prefill-filter\n- type: decode-filter\n- type: queue-scorer\n"
        "- type: disagg-profile-handler\n  parameters: {deciders: {prefill: dec}}\n"
        "- name: dec\n  type: prefix-based-pd-decider\n  parameters: {nonCachedTokens: 1, promptTokens: 50}\n"
        "schedulingProfiles:\n- name: prefill\n  plugins: [{pluginRef: prefill-filter}]\n"
        "- name: decode\n  plugins: [{pluginRef: decode-filter}, {pluginRef: queue-scorer}]\n"
    )
    pipe = pd_pipeline(ds, text)
    assert set(run(pipe, ds, "a" * 196)[0]) == {"decode"}  # 49 tokens
    assert set(run(pipe, ds, "a" * 200)[0]) == {"decode", "prefill"}  # 50 tokens
    # A tokenizer count beats the chars/4 estimate.
    req = LLMRequest("r", "m", prompt="a" * 400, prompt_tokens=10)
    result, _ = pipe.scheduler.schedule(req, list(ds.snapshot().endpoints))
    assert set(result.profile_results) == {"decode"}


def test_non_cached_tokens_zero_disables_disaggregation() -> None:
    """llm-d: ``nonCachedTokens: 0`` (the default) means never disaggregate."""
    ds = make_store(PD_ROLES)
    text = HEAD + (
        "plugins:\n- type: prefill-filter\n- type: decode-filter\n"
        "- type: disagg-profile-handler\n  parameters: {deciders: {prefill: prefix-based-pd-decider}}\n"
        "- type: prefix-based-pd-decider\n"
        "schedulingProfiles:\n- name: prefill\n  plugins: [{pluginRef: prefill-filter}]\n"
        "- name: decode\n  plugins: [{pluginRef: decode-filter}]\n"
    )
    pipe = pd_pipeline(ds, text)
    before = counter("decode-only", "disabled")
    out, headers = run(pipe, ds, "y" * 4000)  # 1000 uncached tokens
    assert set(out) == {"decode"} and headers == {}
    assert counter("decode-only", "disabled") == before + 1
    # The decider's prefix producer was created implicitly and learns from the pick.
    assert pipe.plugins["approx-prefix-cache-producer"].index.endpoints() == out["decode"]  # type: ignore[attr-defined]


def test_decider_without_prefix_info_stays_decode_only() -> None:
    from epp.datastore import EndpointView
    from epp.scheduling.plugins.prefix_based_pd_decider import PrefixBasedPDDecider

    decider = PrefixBasedPDDecider("d", non_cached_tokens=1)
    ep = EndpointView(Endpoint("p", "10.0.0.9", 8000), EndpointMetrics(updated_at=NOW), False)
    req = LLMRequest("r", "m", prompt="y" * 4000)
    assert decider.disaggregate(CycleState(), req, ep) == (False, "no-prefix-info")


def test_legacy_block_size_in_chars_counts_cached_chars_and_tokens() -> None:
    """``blockSize`` (characters) sets the block for both the legacy handler's cached
    characters and the decider's cached tokens (128 chars = 32 tokens, not 16)."""
    ds = make_store(PD_ROLES)
    text = HEAD + (
        "plugins:\n- type: prefill-filter\n- type: decode-filter\n"
        "- type: approx-prefix-cache-producer\n  parameters: {blockSize: 128}\n"
        "- type: prefix-cache-scorer\n"
        "- type: pd-profile-handler\n  parameters: {threshold: 100}\n"
        "schedulingProfiles:\n- name: prefill\n  plugins: [{pluginRef: prefill-filter}]\n"
        "- name: decode\n  plugins: [{pluginRef: decode-filter}, {pluginRef: prefix-cache-scorer}]\n"
    )
    pipe = pd_pipeline(ds, text)
    assert "prefill" in run(pipe, ds, "s" * 1280)[0]  # 10 blocks of 128 chars, uncached
    # Cached on decode now: 1280 chars matched, 50 new chars < 100.
    assert set(run(pipe, ds, "s" * 1280 + "t" * 50)[0]) == {"decode"}
    producer = pipe.plugins["approx-prefix-cache-producer"]
    cycle = CycleState()
    producer.produce(cycle, LLMRequest("r", "model-a", prompt="s" * 1280), [])  # type: ignore[attr-defined]
    assert cycle.prefix_match is not None
    assert cycle.prefix_match.block_tokens == 32 and cycle.prefix_match.block_chars == 128


def test_prefill_unavailable_falls_back_to_decode_only() -> None:
    ds = make_store(["decode", "decode"])
    pipe = pd_pipeline(ds)
    before = counter("decode-only", "no-prefill-endpoint")
    out, headers = run(pipe, ds, "y" * 400)
    assert set(out) == {"decode"} and headers == {}
    assert counter("decode-only", "no-prefill-endpoint") == before + 1


def test_no_decode_endpoint_is_503() -> None:
    ds = make_store(["prefill", "prefill"])
    pipe = pd_pipeline(ds)
    with pytest.raises(
        NoReadyEndpoint, match="profile 'decode': filter 'decode-filter' removed all 2"
    ):
        run(pipe, ds, "y" * 400)


def test_same_endpoint_for_prefill_and_decode_is_decode_only() -> None:
    ds = make_store(["prefill-decode"])
    pipe = pd_pipeline(ds)
    before = counter("decode-only", "same-endpoint")
    out, headers = run(pipe, ds, "y" * 400)
    assert set(out) == {"decode"} and headers == {}
    assert counter("decode-only", "same-endpoint") == before + 1


def test_always_disagg_decider_and_no_decider() -> None:
    ds = make_store(PD_ROLES)
    profiles = (
        "schedulingProfiles:\n- name: prefill\n  plugins: [{pluginRef: prefill-filter}]\n"
        "- name: decode\n  plugins: [{pluginRef: decode-filter}]\n"
    )
    always = (
        HEAD
        + (
            "plugins:\n- type: prefill-filter\n- type: decode-filter\n- type: always-disagg-pd-decider\n"
            "- type: disagg-profile-handler\n  parameters: {deciders: {prefill: always-disagg-pd-decider}}\n"
        )
        + profiles
    )
    out, headers = run(pd_pipeline(ds, always), ds, "hi")
    assert "prefill" in out and headers["x-prefiller-host-port"] == out["prefill"][0]
    plain = (
        HEAD
        + "plugins:\n- type: prefill-filter\n- type: decode-filter\n- type: disagg-profile-handler\n"
        + profiles
    )
    assert "prefill" in run(pd_pipeline(ds, plain), ds, "hi")[0]


def test_decode_only_profiles_work_with_disagg_handler() -> None:
    ds = make_store(PD_ROLES)
    text = HEAD + (
        "plugins:\n- type: decode-filter\n- type: disagg-profile-handler\n"
        "schedulingProfiles:\n- name: decode\n  plugins: [{pluginRef: decode-filter}]\n"
    )
    out, headers = run(pd_pipeline(ds, text), ds, "y" * 4000)
    assert set(out) == {"decode"} and headers == {}


def test_disagg_handler_profile_validation() -> None:
    from epp.config import ConfigError

    bad = HEAD + (
        "plugins:\n- type: decode-filter\n- type: disagg-profile-handler\n"
        "schedulingProfiles:\n- name: dec\n  plugins: [{pluginRef: decode-filter}]\n"
        "- name: other\n  plugins: [{pluginRef: decode-filter}]\n"
    )
    with pytest.raises(ConfigError, match="needs a profile named 'decode'"):
        pd_pipeline(make_store(PD_ROLES), bad)
    with pytest.raises(ConfigError, match=r"parameters.profiles.encode: encode disaggregation"):
        pd_pipeline(
            make_store(PD_ROLES),
            HEAD
            + "plugins:\n- type: disagg-profile-handler\n  parameters: {profiles: {encode: e}}\n",
        )


def test_legacy_pd_profile_handler_threshold() -> None:
    ds = make_store(PD_ROLES)
    text = HEAD + (
        "plugins:\n- type: prefill-header-handler\n- type: prefill-filter\n- type: decode-filter\n"
        "- type: prefix-cache-scorer\n- type: queue-scorer\n- type: max-score-picker\n"
        "- type: pd-profile-handler\n  parameters: {threshold: 100, hashBlockSize: 5}\n"
        "schedulingProfiles:\n- name: prefill\n  plugins: [{pluginRef: prefill-filter}, {pluginRef: max-score-picker}]\n"
        "- name: decode\n  plugins: [{pluginRef: decode-filter}, {pluginRef: prefix-cache-scorer, weight: 2}, {pluginRef: max-score-picker}]\n"
    )
    pipe = pd_pipeline(ds, text)
    assert set(run(pipe, ds, "s" * 99)[0]) == {"decode"}  # 99 uncached chars < 100
    out, headers = run(pipe, ds, "s" * 640)
    assert "prefill" in out and headers["x-prefiller-host-port"] == out["prefill"][0]
    # Now cached on decode: 640 + 50 new chars -> 50 uncached < 100.
    assert set(run(pipe, ds, "s" * 640 + "t" * 50)[0]) == {"decode"}


def test_served_endpoint_learning_and_stale_metrics_do_not_crash() -> None:
    ds = make_store([None, None, None])
    for e in ds.endpoints():
        ds.update_metrics(e.key, EndpointMetrics())  # never scraped -> stale
    pipe = build_pipeline(load_default_config(), datastore=ds, rng=random.Random(0))
    req = LLMRequest("r", "m", prompt="p" * 640)
    result, cycle = pipe.scheduler.schedule(req, list(ds.snapshot().endpoints))
    for hook in pipe.pre_request:
        hook.pre_request(cycle, req, result, {})
    primary = result.primary.targets[0].key
    served = next(e.key for e in ds.endpoints() if e.key != primary)
    for hook in pipe.response_complete:
        hook.response_complete(cycle, req, result, served, 200)
    index = pipe.plugins["approx-prefix-cache-producer"].index  # type: ignore[attr-defined]
    assert sorted(index.endpoints()) == sorted([primary, served])
    assert isinstance(CycleState().rejections, dict)


def test_only_pool_members_learn_prefixes() -> None:
    """A served address outside the pool, or an endpoint removed while its request was
    being scheduled, must not enter the index (no removal event would purge it)."""
    ds = make_store([None, None])
    pipe = build_pipeline(load_default_config(), datastore=ds, rng=random.Random(0))
    index = pipe.plugins["approx-prefix-cache-producer"].index  # type: ignore[attr-defined]
    req = LLMRequest("r", "m", prompt="p" * 640)
    result, cycle = pipe.scheduler.schedule(req, list(ds.snapshot().endpoints))
    primary = result.primary.targets[0].key
    for hook in pipe.response_complete:
        hook.response_complete(cycle, req, result, "192.0.2.1:8000", 200)
    assert index.endpoints() == []
    ds.replace_endpoints([e for e in ds.endpoints() if e.key != primary])  # removed meanwhile
    for hook in pipe.pre_request:
        hook.pre_request(cycle, req, result, {})
    assert index.endpoints() == [] and len(index) == 0


def test_block_size_and_block_size_tokens_conflict() -> None:
    from epp.config import ConfigError

    text = HEAD + (
        "plugins:\n- type: approx-prefix-cache-producer\n"
        "  parameters: {blockSize: 64, blockSizeTokens: 16}\n"
    )
    with pytest.raises(
        ConfigError, match=r"plugins\[0\].parameters.blockSize: give blockSizeTokens"
    ):
        build_pipeline(load_config_text(text))
