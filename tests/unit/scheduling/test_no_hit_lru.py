"""no-hit-lru-scorer: cold requests rotate over the endpoints in LRU order; requests
with a prefix hit score neutral and do not move the LRU."""

from __future__ import annotations

import random
from types import MappingProxyType

import pytest

from epp.config import ConfigError, load_config_text
from epp.datastore import Datastore, Endpoint, EndpointMetrics
from epp.scheduling import CycleState, LLMRequest, Pipeline, build_pipeline
from epp.scheduling.plugins.no_hit_lru_scorer import NoHitLRUScorer
from epp.scheduling.types import PrefixMatchInfo

HEAD = "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\n"


def setup(plugins: str, n: int = 4, roles: tuple[str, ...] = ()) -> tuple[Datastore, Pipeline]:
    ds = Datastore(clock=lambda: 10.0, staleness_s=1e9)
    eps = [
        Endpoint(
            f"p{i}",
            f"10.3.0.{i}",
            8000,
            labels=MappingProxyType({"llm-d.ai/role": roles[i]} if roles else {}),
        )
        for i in range(n)
    ]
    ds.replace_endpoints(eps)
    for e in eps:
        ds.update_metrics(e.key, EndpointMetrics(updated_at=10.0))
    return ds, build_pipeline(load_config_text(HEAD + plugins), datastore=ds, rng=random.Random(0))


def route(pipe: Pipeline, ds: Datastore, prompt: str) -> str:
    req = LLMRequest("r", "m", prompt=prompt)
    result, cycle = pipe.scheduler.schedule(req, list(ds.snapshot().endpoints))
    for h in pipe.pre_request:
        h.pre_request(cycle, req, result, {})
    return result.primary.targets[0].key


PROMPT = "x" * 400  # several 64-character blocks


def test_cold_requests_rotate_over_all_endpoints_and_hits_stay() -> None:
    ds, pipe = setup(
        "plugins:\n- type: prefix-cache-scorer\n- type: no-hit-lru-scorer\n"
        "schedulingProfiles:\n- name: default\n  plugins:\n"
        "  - {pluginRef: prefix-cache-scorer, weight: 3}\n"
        "  - {pluginRef: no-hit-lru-scorer, weight: 2}\n"
    )
    # Four new prefixes: each lands on a different endpoint (least recently used first).
    firsts = [route(pipe, ds, f"group {g} " + PROMPT) for g in range(4)]
    assert sorted(firsts) == sorted(e.key for e in ds.endpoints())
    # A fifth new prefix goes to the endpoint whose cold request is the oldest.
    assert route(pipe, ds, "group 4 " + PROMPT) == firsts[0]
    # Hits follow their prefix and leave the LRU order alone.
    scorer = pipe.plugins["no-hit-lru-scorer"]
    assert isinstance(scorer, NoHitLRUScorer)
    before = scorer.recently_used()
    assert route(pipe, ds, "group 2 " + PROMPT + " more") == firsts[2]
    assert scorer.recently_used() == before


def test_formula_never_used_first_then_lru_order() -> None:
    ds, pipe = setup("plugins:\n- type: no-hit-lru-scorer\n")
    scorer = pipe.plugins["no-hit-lru-scorer"]
    assert isinstance(scorer, NoHitLRUScorer)
    views = list(ds.snapshot().endpoints)
    keys = [v.key for v in views]
    # p3 used longest ago, then p1; p0 and p2 never used (candidate order).
    scorer._touch([views[3]])
    scorer._touch([views[1]])
    cycle = CycleState()  # no prefix information at all: cold
    scores = dict(zip(keys, scorer.score(cycle, LLMRequest("r", "m"), views), strict=True))
    # ranks: p0 0, p2 1, p3 2, p1 3 -> 1 - r/3
    assert scores == pytest.approx(
        {keys[0]: 1.0, keys[2]: 2 / 3, keys[3]: 1 / 3, keys[1]: 0.0}, abs=1e-9
    )
    # A hit on any endpoint (even one not among the candidates) is neutral.
    hit = CycleState()
    hit.prefix_match = PrefixMatchInfo(total_blocks=4, block_tokens=16, matches={"elsewhere": 1})
    assert list(scorer.score(hit, LLMRequest("r", "m"), views)) == [0.5] * 4
    # A single candidate scores 1.
    assert list(scorer.score(CycleState(), LLMRequest("r", "m"), views[:1])) == [1.0]


def test_lru_is_bounded_and_forgets_removed_endpoints() -> None:
    ds, pipe = setup("plugins:\n- type: no-hit-lru-scorer\n  parameters: {lruSize: 2}\n")
    scorer = pipe.plugins["no-hit-lru-scorer"]
    assert isinstance(scorer, NoHitLRUScorer)
    views = list(ds.snapshot().endpoints)
    for v in views:
        scorer._touch([v])
    assert scorer.recently_used() == [views[2].key, views[3].key]
    ds.replace_endpoints([e for e in ds.endpoints() if e.key != views[3].key])
    assert scorer.recently_used() == [views[2].key]


def test_prefill_endpoint_of_a_cold_request_is_marked_used() -> None:
    ds, pipe = setup(
        "plugins:\n- type: no-hit-lru-scorer\n- type: always-disagg-pd-decider\n"
        "- type: decode-filter\n- type: prefill-filter\n"
        "- type: disagg-profile-handler\n"
        "  parameters: {deciders: {prefill: always-disagg-pd-decider}}\n"
        "schedulingProfiles:\n"
        "- name: decode\n  plugins: [{pluginRef: decode-filter}, {pluginRef: no-hit-lru-scorer}]\n"
        "- name: prefill\n  plugins: [{pluginRef: prefill-filter}, {pluginRef: no-hit-lru-scorer}]\n",
        n=4,
        roles=("decode", "decode", "prefill", "prefill"),
    )
    scorer = pipe.plugins["no-hit-lru-scorer"]
    assert isinstance(scorer, NoHitLRUScorer)
    assert route(pipe, ds, PROMPT) == "10.3.0.0:8000"
    # Decode and prefill endpoints are both marked used, decode first.
    assert scorer.recently_used() == ["10.3.0.0:8000", "10.3.0.2:8000"]
    # The next cold request goes to the other decode and the other prefill endpoint.
    assert route(pipe, ds, "other " + PROMPT) == "10.3.0.1:8000"
    assert scorer.recently_used()[-2:] == ["10.3.0.1:8000", "10.3.0.3:8000"]


def test_bad_parameters_name_the_key() -> None:
    with pytest.raises(ConfigError, match=r"lruSize"):
        setup("plugins:\n- type: no-hit-lru-scorer\n  parameters: {lruSize: 0}\n")
    with pytest.raises(ConfigError, match=r"prefixPluginName"):
        setup(
            "plugins:\n- type: queue-scorer\n"
            "- type: no-hit-lru-scorer\n  parameters: {prefixPluginName: queue-scorer}\n"
        )
    with pytest.raises(ConfigError, match=r"bogus"):
        setup("plugins:\n- type: no-hit-lru-scorer\n  parameters: {bogus: 1}\n")
