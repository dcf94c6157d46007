"""The scheduler's fast paths give exactly what the straightforward formulas give.

Each rewritten hot-path piece (the runner's weighted sum, the max-score picker's
tie-breaking, the routed-load, no-hit-LRU, load-aware and KV-utilization scorers)
is checked against a plain reference implementation on random inputs.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Sequence
from types import MappingProxyType

import pytest

from epp.datastore import Endpoint, EndpointMetrics, EndpointView
from epp.scheduling import CycleState, LLMRequest
from epp.scheduling.plugins.kv_cache_utilization_scorer import KVCacheUtilizationScorer
from epp.scheduling.plugins.load_aware_scorer import LoadAwareScorer
from epp.scheduling.plugins.max_score_picker import MaxScorePicker
from epp.scheduling.plugins.no_hit_lru_scorer import NoHitLRUScorer
from epp.scheduling.plugins.routed_load_scorer import RoutedLoadScorer
from epp.scheduling.scheduler import weighted_totals

REQ = LLMRequest("r", "m")


def view(i: int, *, stale: bool = False, **m: object) -> EndpointView:
    ep = Endpoint(f"p{i}", f"10.9.0.{i}", 8000, labels=MappingProxyType({}))
    return EndpointView(ep, EndpointMetrics(updated_at=1.0, **m), stale)  # type: ignore[arg-type]


# -- the runner's weighted sum -------------------------------------------------------


def reference_totals(
    lists: Sequence[Sequence[float]], weights: Sequence[float], n: int
) -> list[float]:
    """The runner's original per-candidate loop."""
    totals = [0.0] * n
    for scores, w in zip(lists, weights, strict=True):
        if len(scores) == n and not any(scores):
            continue
        for i in range(n):
            v = scores[i]
            if v > 0.0:
                totals[i] += w * (v if v < 1.0 else 1.0)
    return totals


def random_list(rng: random.Random, n: int, wild: bool) -> list[float]:
    kind = rng.randrange(4)
    if kind == 0:
        return [0.0] * n
    if kind == 1:
        return [rng.choice((0.5, 1.0))] * n
    if not wild:
        return [rng.choice((0.0, -0.0, 1.0, rng.random())) for _ in range(n)]
    return [
        rng.choice((math.nan, -1.5, 2.5, math.inf, -math.inf, 0.0, rng.random())) for _ in range(n)
    ]


def test_weighted_totals_equal_the_plain_loop_bit_for_bit() -> None:
    rng = random.Random(7)
    for _ in range(2000):
        n = rng.randrange(1, 20)
        k = rng.randrange(0, 8)
        unit = [rng.random() < 0.5 for _ in range(k)]
        lists = [random_list(rng, n, wild=not u) for u in unit]
        weights = [rng.choice((1.0, 2.0, 4.0, 10.0, rng.random() * 5 + 1e-3)) for _ in range(k)]
        got = weighted_totals(lists, weights, n, unit)
        want = reference_totals(lists, weights, n)
        assert got == want  # exact floats
        assert [math.copysign(1.0, x) for x in got] == [math.copysign(1.0, x) for x in want]
        # Without flags every list is clamped: same result again.
        assert weighted_totals(lists, weights, n) == want


def test_weighted_totals_wrong_lengths() -> None:
    assert weighted_totals([[0.5, 0.5, 9.0]], [2.0], 2) == [1.0, 1.0]  # extra ignored
    with pytest.raises(IndexError):
        weighted_totals([[0.5]], [2.0], 2)


# -- max-score-picker ----------------------------------------------------------------


def test_max_score_picker_without_ties_equals_a_full_sort() -> None:
    rng = random.Random(3)
    views = [view(i) for i in range(16)]
    for k in (1, 2, 3, 16, 20):
        picker = MaxScorePicker("p", random.Random(0), max_endpoints=k)
        for _ in range(200):
            scores = [rng.random() * 20 for _ in views]
            r = picker.pick(CycleState(), REQ, views, scores)
            order = sorted(range(16), key=lambda i: -scores[i])[:k]
            assert r.targets == [views[i] for i in order]
            assert r.scores == [scores[i] for i in order]


def test_max_score_picker_breaks_ties_uniformly() -> None:
    views = [view(i) for i in range(5)]
    picker = MaxScorePicker("p", random.Random(11), max_endpoints=2)
    # Three-way tie on top: all six ordered pairs of them, about equally often.
    pairs: Counter[tuple[str, str]] = Counter()
    for _ in range(3000):
        r = picker.pick(CycleState(), REQ, views, [1.0, 3.0, 3.0, 0.5, 3.0])
        assert r.scores == [3.0, 3.0]
        pairs[(r.targets[0].key, r.targets[1].key)] += 1
    assert len(pairs) == 6 and min(pairs.values()) > 400
    # A unique best, then a tie for second place: best first, either of the tie next.
    seconds: Counter[str] = Counter()
    for _ in range(2000):
        r = picker.pick(CycleState(), REQ, views, [2.0, 1.0, 5.0, 2.0, 0.0])
        assert r.targets[0] is views[2] and r.scores == [5.0, 2.0]
        seconds[r.targets[1].key] += 1
    assert set(seconds) == {views[0].key, views[3].key} and min(seconds.values()) > 850
    # Everything tied, k = n: a uniformly random permutation.
    firsts: Counter[str] = Counter()
    picker5 = MaxScorePicker("p5", random.Random(5), max_endpoints=5)
    for _ in range(2500):
        r = picker5.pick(CycleState(), REQ, views, [1.0] * 5)
        assert sorted(t.key for t in r.targets) == sorted(v.key for v in views)
        firsts[r.targets[0].key] += 1
    assert len(firsts) == 5 and min(firsts.values()) > 400


# -- routed-load-scorer --------------------------------------------------------------


def test_routed_load_scores_equal_the_load_formula() -> None:
    rng = random.Random(5)
    views = [view(i) for i in range(12)]
    for _ in range(500):
        now = 1000.0 + rng.random() * 100
        s = RoutedLoadScorer(
            "r", half_life_s=rng.choice((1.0, 10.0, 30.0)), clock=lambda now=now: now
        )
        for v in views:
            if rng.random() < 0.7:
                # as_of in the past, now, or (a clock that went back) in the future
                s._counts[v.key] = (
                    rng.random() * 8,
                    now + rng.choice((-50, -1, 0, 3)) * rng.random(),
                )
        loads = [s.load(v.key, now) for v in views]
        lo, hi = min(loads), max(loads)
        want = [1.0] * len(views) if hi - lo <= 1e-9 else [(hi - c) / (hi - lo) for c in loads]
        assert list(s.score(CycleState(), REQ, views)) == want  # exact floats
        assert all(0.0 <= x <= 1.0 for x in want)  # unit_scores holds


# -- no-hit-lru-scorer ---------------------------------------------------------------


def reference_lru_scores(lru: dict[str, None], endpoints: list[EndpointView]) -> list[float]:
    n = len(endpoints)
    if n == 1:
        return [1.0]
    position = {k: i for i, k in enumerate(lru)}
    never = [i for i, e in enumerate(endpoints) if e.key not in position]
    rank = [0] * n
    for r, i in enumerate(never):
        rank[i] = r
    for i, e in enumerate(endpoints):
        pos = position.get(e.key)
        if pos is not None:
            rank[i] = len(never) + pos
    return [max(0.0, 1.0 - r / (n - 1)) for r in rank]


def test_no_hit_lru_scores_equal_the_rank_formula() -> None:
    rng = random.Random(9)
    pool = [view(i) for i in range(20)]
    for _ in range(1000):
        s = NoHitLRUScorer("lru")
        for v in rng.sample(pool, rng.randrange(0, 21)):  # may hold non-candidates
            s._lru[v.key] = None
        cands = rng.sample(pool, rng.randrange(1, 21))
        got = list(s.score(CycleState(), REQ, cands))  # no prefix info: cold
        assert got == reference_lru_scores(s._lru, cands)
        assert all(0.0 <= x <= 1.0 for x in got)


# -- load-aware and KV-utilization: formula and per-candidate-list cache ---------------


def test_load_aware_and_kv_scores_follow_the_views_they_are_given() -> None:
    la = LoadAwareScorer("la", threshold=16)
    kv = KVCacheUtilizationScorer("kv")
    rng = random.Random(2)
    views = [view(i, waiting=rng.randrange(0, 20), kv_cache_usage=rng.random()) for i in range(8)]
    views.append(view(8, stale=True, waiting=1, kv_cache_usage=0.1))

    def la_ref(vs: list[EndpointView], t: int) -> list[float]:
        return [
            0.0
            if v.stale or v.metrics.waiting >= t
            else 0.5 * (1.0 - max(v.metrics.waiting, 0) / t)
            for v in vs
        ]

    def kv_ref(vs: list[EndpointView]) -> list[float]:
        raw = [0.0 if v.stale else 1.0 - v.metrics.kv_cache_usage for v in vs]
        return [(x if x < 1.0 else 1.0) if x > 0.0 else 0.0 for x in raw]  # the runner's clamp

    cands = list(views)
    assert list(la.score(CycleState(), REQ, cands)) == la_ref(views, 16)
    assert list(kv.score(CycleState(), REQ, cands)) == kv_ref(views)
    # The caller's list changing afterwards does not affect the next answer.
    cands[0] = view(0, waiting=0, kv_cache_usage=0.0)
    assert la.score(CycleState(), REQ, cands)[0] == 0.5
    assert kv.score(CycleState(), REQ, cands)[0] == 1.0
    # New metrics for one endpoint (a new snapshot view), and a new threshold.
    fresh = [*views[:3], view(3, waiting=0, kv_cache_usage=0.5), *views[4:]]
    assert list(la.score(CycleState(), REQ, fresh)) == la_ref(fresh, 16)
    assert list(kv.score(CycleState(), REQ, fresh)) == kv_ref(fresh)
    la.threshold = 4
    assert list(la.score(CycleState(), REQ, fresh)) == la_ref(fresh, 4)
    # Out-of-range and NaN utilization: clamped exactly as the runner clamps.
    odd = [
        view(0, kv_cache_usage=1.5),
        view(1, kv_cache_usage=-0.5),
        view(2, kv_cache_usage=math.nan),
    ]
    assert list(kv.score(CycleState(), REQ, odd)) == [0.0, 1.0, 0.0]


def test_candidate_keys_follow_the_list_they_are_given() -> None:
    from epp.scheduling.plugins._util import CandidateKeys

    ck = CandidateKeys()
    views = [view(i) for i in range(4)]
    d = {v.key: i for i, v in enumerate(views)}
    cands = list(views)
    assert ck.of(cands)(d) == (0, 1, 2, 3)
    cands.reverse()  # the caller's list changes after the call: not the cached copy
    assert ck.of(cands)(d) == (3, 2, 1, 0)
    assert ck.of([views[2], views[0]])(d) == (2, 0)
    with pytest.raises(KeyError):
        ck.of(views)({})
    with pytest.raises(ValueError, match="two candidates"):
        ck.of([views[0]])


def test_prefix_cache_scores_equal_matched_over_total() -> None:
    from epp.scheduling.plugins.prefix_cache_scorer import PrefixCacheScorer
    from epp.scheduling.types import PrefixMatchInfo, PrefixMatchProducer

    class Fixed(PrefixMatchProducer):
        type_name = "fixed"

        def __init__(self) -> None:
            self.name = "fixed"

        @classmethod
        def from_params(cls, name, params, ctx):  # type: ignore[no-untyped-def]
            raise NotImplementedError

        def produce(self, cycle: CycleState, request: LLMRequest, endpoints: object) -> None:
            raise NotImplementedError

    rng = random.Random(4)
    pool = [view(i) for i in range(10)]
    scorer = PrefixCacheScorer("pc", Fixed())
    for _ in range(300):
        cands = rng.sample(pool, rng.randrange(1, 11))
        total = rng.randrange(1, 40)
        matches = {
            v.key: rng.randrange(1, total + 1) for v in rng.sample(pool, rng.randrange(0, 5))
        }
        cycle = CycleState()
        cycle.values["fixed"] = PrefixMatchInfo(total, 16, matches)
        want = [matches.get(v.key, 0) / total for v in cands] if matches else [0.0] * len(cands)
        assert list(scorer.score(cycle, REQ, cands)) == want


def test_list_memo_keeps_the_last_two_lists() -> None:
    from epp.scheduling.plugins._util import ListMemo

    memo: ListMemo[str] = ListMemo()
    a, b, c = [view(0), view(1)], [view(2), view(3)], [view(4)]
    assert memo.get(a) is None
    memo.put(a, "a")
    memo.put(b, "b")
    assert memo.get(list(a)) == "a" and memo.get(b) == "b"  # by value, both kept
    memo.put(c, "c")  # evicts the older one
    assert memo.get(a) is None and memo.get(b) == "b" and memo.get(c) == "c"
    a2 = [view(0), view(1, waiting=3)]  # new metrics for one endpoint: another list
    assert memo.get(a2) is None
    # Two profiles alternating over different candidates keep getting their own scores.
    la = LoadAwareScorer("la", threshold=8)
    d = [view(0, waiting=2), view(1, waiting=4)]
    p = [view(2, waiting=8), view(3, waiting=0)]
    for _ in range(3):
        assert list(la.score(CycleState(), REQ, d)) == [0.375, 0.25]
        assert list(la.score(CycleState(), REQ, p)) == [0.0, 0.5]
