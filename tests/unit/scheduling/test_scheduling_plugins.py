"""Formulas of the scorers, pickers and filters, including edge cases."""

from __future__ import annotations

import base64
import math
import random
from collections import Counter
from types import MappingProxyType

import pytest

from epp.config import ConfigError, Params
from epp.datastore import Endpoint, EndpointMetrics, EndpointView
from epp.scheduling import CycleState, LLMRequest, build_pipeline
from epp.scheduling.plugins.decode_filter import DecodeFilter
from epp.scheduling.plugins.encode_filter import EncodeFilter
from epp.scheduling.plugins.kv_cache_utilization_scorer import KVCacheUtilizationScorer
from epp.scheduling.plugins.label_selector_filter import LabelSelectorFilter
from epp.scheduling.plugins.load_aware_scorer import LoadAwareScorer
from epp.scheduling.plugins.lora_affinity_scorer import LoraAffinityScorer
from epp.scheduling.plugins.max_score_picker import MaxScorePicker
from epp.scheduling.plugins.prefill_filter import PrefillFilter
from epp.scheduling.plugins.queue_scorer import QueueScorer
from epp.scheduling.plugins.random_picker import RandomPicker
from epp.scheduling.plugins.running_requests_size_scorer import RunningRequestsSizeScorer
from epp.scheduling.plugins.session_affinity_scorer import SessionAffinityScorer
from epp.scheduling.plugins.utilization_detector import UtilizationDetector
from epp.scheduling.plugins.weighted_random_picker import WeightedRandomPicker
from epp.scheduling.registry import BuildContext

REQ = LLMRequest("r", "m", prompt="hello")


def view(
    i: int,
    *,
    stale: bool = False,
    role: str | None = None,
    labels: dict[str, str] | None = None,
    **m: object,
) -> EndpointView:
    lab = dict(labels or {})
    if role is not None:
        lab["llm-d.ai/role"] = role
    ep = Endpoint(f"pod{i}", f"10.0.0.{i}", 8000, labels=MappingProxyType(lab))
    return EndpointView(ep, EndpointMetrics(updated_at=1.0, **m), stale)  # type: ignore[arg-type]


def score(scorer: object, views: list[EndpointView], req: LLMRequest = REQ) -> list[float]:
    return list(scorer.score(CycleState(), req, views))  # type: ignore[attr-defined]


def test_queue_scorer_min_max() -> None:
    s = QueueScorer("q")
    assert score(s, [view(0, waiting=0), view(1, waiting=5), view(2, waiting=10)]) == [
        1.0,
        0.5,
        0.0,
    ]
    assert score(s, [view(0, waiting=3), view(1, waiting=3)]) == [1.0, 1.0]
    # Stale endpoints score worst and do not stretch the range.
    assert score(s, [view(0, waiting=100, stale=True), view(1, waiting=2), view(2, waiting=4)]) == [
        0.0,
        1.0,
        0.0,
    ]
    assert score(s, [view(0, stale=True)]) == [0.0]


def test_running_requests_size_scorer_uses_running() -> None:
    s = RunningRequestsSizeScorer("r")
    assert score(
        s, [view(0, running=8, waiting=0), view(1, running=2, waiting=9), view(2, running=4)]
    ) == [0.0, 1.0, pytest.approx(2 / 3)]


def test_kv_cache_utilization_scorer() -> None:
    s = KVCacheUtilizationScorer("kv")
    assert score(
        s,
        [
            view(0, kv_cache_usage=0.25),
            view(1, kv_cache_usage=1.0),
            view(2, kv_cache_usage=0.0, stale=True),
        ],
    ) == [0.75, 0.0, 0.0]


def test_load_aware_scorer() -> None:
    s = LoadAwareScorer("l", threshold=10)
    got = score(
        s,
        [
            view(0, waiting=0),
            view(1, waiting=5),
            view(2, waiting=10),
            view(3, waiting=20),
            view(4, stale=True),
        ],
    )
    assert got == [0.5, 0.25, 0.0, 0.0, 0.0]
    assert score(LoadAwareScorer("d"), [view(0, waiting=64)]) == [0.25]  # default threshold 128


def test_lora_affinity_scorer() -> None:
    s = LoraAffinityScorer("lora")
    req = LLMRequest("r", "sql-lora")
    views = [
        view(0, active_loras=frozenset({"sql-lora"}), max_loras=1),
        view(1, active_loras=frozenset({"x"}), max_loras=2),
        view(2, active_loras=frozenset({"x"}), waiting_loras=frozenset({"sql-lora"}), max_loras=2),
        view(3, active_loras=frozenset({"x"}), max_loras=1),
    ]
    assert score(s, views, req) == [1.0, 0.8, 0.6, 0.0]


def test_session_affinity_scorer_and_response_header() -> None:
    s = SessionAffinityScorer("s")
    views = [view(0), view(1), view(2)]
    token = base64.b64encode(b"10.0.0.1:8000").decode()
    assert score(s, views, LLMRequest("r", "m", headers={"x-session-token": token})) == [
        0.0,
        1.0,
        0.0,
    ]
    assert score(s, views, LLMRequest("r", "m", headers={"x-session-token": "%%%not-b64"})) == [
        0.0,
        0.0,
        0.0,
    ]
    assert score(s, views, LLMRequest("r", "m")) == [0.0, 0.0, 0.0]
    from epp.scheduling import ProfileRunResult, SchedulingResult

    result = SchedulingResult({"default": ProfileRunResult([views[2]])}, "default")
    assert s.response_headers(CycleState(), REQ, result, None) == {
        "x-session-token": base64.b64encode(b"10.0.0.2:8000").decode()
    }
    assert s.response_headers(CycleState(), REQ, result, "10.0.0.0:8000") == {
        "x-session-token": base64.b64encode(b"10.0.0.0:8000").decode()
    }


def test_utilization_detector() -> None:
    d = UtilizationDetector("u", queue_depth=5, kv_util=0.8)
    assert d.saturation([view(0, waiting=10, kv_cache_usage=0.4)]) == 2.0
    assert d.saturation([view(0, waiting=1, kv_cache_usage=0.4)]) == 0.5
    assert (
        d.saturation([view(0, waiting=0, kv_cache_usage=0.0), view(1, stale=True)]) == 0.5
    )  # stale = 1.0
    assert d.saturation([]) == 1.0


def test_max_score_picker_best_and_random_ties() -> None:
    p = MaxScorePicker("p", random.Random(1))
    views = [view(0), view(1), view(2)]
    assert p.pick(CycleState(), REQ, views, [0.1, 0.9, 0.5]).targets == [views[1]]
    wins = Counter(
        p.pick(CycleState(), REQ, views, [1.0, 1.0, 0.0]).targets[0].key for _ in range(200)
    )
    assert set(wins) == {"10.0.0.0:8000", "10.0.0.1:8000"} and min(wins.values()) > 60
    p3 = MaxScorePicker("p3", random.Random(1), max_endpoints=3)
    r = p3.pick(CycleState(), REQ, views, [0.2, 0.9, 0.5])
    assert [t.key for t in r.targets] == ["10.0.0.1:8000", "10.0.0.2:8000", "10.0.0.0:8000"]
    assert r.scores == [0.9, 0.5, 0.2]
    assert p.pick(CycleState(), REQ, [], []).targets == []


def test_random_picker_uniform_and_distinct() -> None:
    p = RandomPicker("p", random.Random(2), max_endpoints=2)
    views = [view(i) for i in range(4)]
    seen: Counter[str] = Counter()
    for _ in range(400):
        r = p.pick(CycleState(), REQ, views, [0.0, 9.0, 0.0, 0.0])
        assert len({t.key for t in r.targets}) == 2
        seen.update(t.key for t in r.targets)
    assert min(seen.values()) > 150  # scores ignored: each ~200


def test_weighted_random_picker_proportional() -> None:
    p = WeightedRandomPicker("w", random.Random(3))
    views = [view(0), view(1), view(2)]
    wins = Counter(
        p.pick(CycleState(), REQ, views, [3.0, 1.0, 0.0]).targets[0].key for _ in range(4000)
    )
    assert "10.0.0.2:8000" not in wins  # zero weight never beats a positive one
    assert wins["10.0.0.0:8000"] / 4000 == pytest.approx(0.75, abs=0.03)
    all_zero = Counter(
        p.pick(CycleState(), REQ, views, [0.0, 0.0, 0.0]).targets[0].key for _ in range(3000)
    )
    assert min(all_zero.values()) > 900  # uniform fallback


def test_role_filters() -> None:
    views = [
        view(0, role="decode"),
        view(1, role="prefill"),
        view(2),
        view(3, role="prefill-decode"),
        view(4, role="both"),
        view(5, role="encode-prefill-decode"),
        view(6, role="encode"),
        view(7, role="encode-prefill"),
    ]

    def keys(f: object) -> list[int]:
        return [int(v.endpoint.name[3:]) for v in f.filter(CycleState(), REQ, views)]  # type: ignore[attr-defined]

    assert keys(DecodeFilter("d")) == [0, 2, 3, 4, 5]
    assert keys(PrefillFilter("p")) == [1, 3, 4, 5, 7]
    assert keys(EncodeFilter("e")) == [5, 6, 7]


def _label_filter(raw: dict[str, object]) -> LabelSelectorFilter:
    from epp.config import load_config_text

    ctx = BuildContext(
        load_config_text("apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\n")
    )
    return LabelSelectorFilter.from_params(
        "l", Params(raw, source="t.yaml", path="plugins[0].parameters"), ctx
    )


def test_label_selector_filter() -> None:
    views = [
        view(0, labels={"zone": "a", "gpu": "h100"}),
        view(1, labels={"zone": "b"}),
        view(2, labels={}),
    ]

    def keep(raw: dict[str, object]) -> list[int]:
        return [
            int(v.endpoint.name[3:]) for v in _label_filter(raw).filter(CycleState(), REQ, views)
        ]

    assert keep({"matchLabels": {"zone": "a"}}) == [0]
    assert keep(
        {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a", "b"]}]}
    ) == [0, 1]
    assert keep({"matchExpressions": [{"key": "zone", "operator": "NotIn", "values": ["a"]}]}) == [
        1,
        2,
    ]
    assert keep({"matchExpressions": [{"key": "gpu", "operator": "Exists"}]}) == [0]
    assert keep({"matchExpressions": [{"key": "gpu", "operator": "DoesNotExist"}]}) == [1, 2]
    assert (
        keep(
            {
                "matchLabels": {"zone": "b"},
                "matchExpressions": [{"key": "gpu", "operator": "Exists"}],
            }
        )
        == []
    )
    with pytest.raises(
        ConfigError,
        match=r"t.yaml: plugins\[0\].parameters.matchExpressions\[0\].values: operator In needs",
    ):
        _label_filter({"matchExpressions": [{"key": "zone", "operator": "In"}]})
    with pytest.raises(ConfigError, match=r"plugins\[0\].parameters.matchLabels: give matchLabels"):
        _label_filter({})


def test_scores_outside_unit_interval_are_clamped_by_runner() -> None:
    from epp.config import load_config_text

    cfg = load_config_text(
        "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\nplugins:\n- type: queue-scorer\n"
    )
    pipe = build_pipeline(cfg, rng=random.Random(0))
    prof = pipe.scheduler.profiles["default"]

    class Wild:
        name = "wild"
        type_name = "wild"

        def score(
            self, cycle: object, request: object, endpoints: list[EndpointView]
        ) -> list[float]:
            return [5.0, -3.0, math.nan]

    prof.scorers = [(Wild(), 2.0, lambda _t: None)]  # type: ignore[list-item]
    captured: list[list[float]] = []
    orig = prof.picker.pick

    def spy(
        cycle: CycleState, request: LLMRequest, endpoints: list[EndpointView], scores: list[float]
    ):  # type: ignore[no-untyped-def]
        captured.append(list(scores))
        return orig(cycle, request, endpoints, scores)

    prof.picker.pick = spy  # type: ignore[method-assign]
    prof.run(CycleState(), REQ, [view(0), view(1), view(2)])
    assert captured == [[2.0, 0.0, 0.0]]


def test_every_cataloged_scheduler_type_is_implemented() -> None:
    import epp.scheduling.plugins  # noqa: F401
    from epp.config import known_plugin_types, plugin_kind
    from epp.scheduling.registry import NOT_BUILT, plugin_class

    missing = [
        t
        for t in known_plugin_types()
        if plugin_kind(t) not in NOT_BUILT and plugin_class(t) is None and not t.startswith("test-")
    ]
    assert missing == []
    # And every registered class declares the kind the catalog has for it.
    for t in known_plugin_types():
        cls = plugin_class(t)
        if cls is not None:
            assert cls.kind is plugin_kind(t), t
            assert cls.type_name == t


@pytest.mark.parametrize(
    "ptype",
    [
        "queue-scorer",
        "running-requests-size-scorer",
        "kv-cache-utilization-scorer",
        "lora-affinity-scorer",
        "decode-filter",
        "prefill-filter",
        "encode-filter",
        "always-disagg-pd-decider",
    ],
)
def test_parameterless_plugins_reject_parameters(ptype: str) -> None:
    from epp.config import load_config_text

    head = "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\nplugins:\n"
    pipe = build_pipeline(load_config_text(head + f"- type: {ptype}\n"))
    assert pipe.plugins[ptype].name == ptype
    cfg = load_config_text(head + f"- type: {ptype}\n  parameters: {{bogus: 1}}\n", source="c.yaml")
    with pytest.raises(
        ConfigError, match=r"c.yaml: plugins\[0\].parameters.bogus: unknown parameter"
    ):
        build_pipeline(cfg)


@pytest.mark.parametrize("ptype", ["max-score-picker", "random-picker", "weighted-random-picker"])
def test_pickers_share_max_num_of_endpoints(ptype: str) -> None:
    from epp.config import load_config_text

    head = "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\nplugins:\n"
    rng = random.Random(5)
    pipe = build_pipeline(
        load_config_text(head + f"- type: {ptype}\n  parameters: {{maxNumOfEndpoints: 3}}\n"),
        rng=rng,
    )
    picker = pipe.plugins[ptype]
    assert picker.max_endpoints == 3 and picker.rng is rng  # type: ignore[attr-defined]
    views = [view(i) for i in range(5)]
    r = picker.pick(CycleState(), REQ, views, [0.5, 0.4, 0.3, 0.2, 0.1])  # type: ignore[attr-defined]
    assert len({t.key for t in r.targets}) == 3
    cfg = load_config_text(
        head + f"- type: {ptype}\n  parameters: {{maxNumOfEndpoints: 65}}\n", source="c.yaml"
    )
    with pytest.raises(ConfigError, match=r"c.yaml: plugins\[0\].parameters.maxNumOfEndpoints"):
        build_pipeline(cfg)
