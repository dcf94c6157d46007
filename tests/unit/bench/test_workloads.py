"""Workload generation: determinism, shapes, token lengths by the simulator's tokenizer."""

from __future__ import annotations

import itertools
from dataclasses import replace

import pytest

from pdroute.bench.workloads import (
    WORKLOADS,
    WorkloadError,
    WorkloadSpec,
    default_spec,
    describe,
    generate,
    poisson_arrivals,
    text_tokens,
    words,
)
from pdroute.sim.tokenizer import Tokenizer


def small(name: str, **kw: object) -> WorkloadSpec:
    spec = replace(default_spec(name, quick=True), duration_s=4.0)
    return replace(spec, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", WORKLOADS)
def test_same_seed_same_plan_other_seed_other_plan(name: str) -> None:
    a = generate(small(name))
    b = generate(small(name))
    c = generate(small(name, seed=1))
    assert a and a == b
    assert [r.prompt for r in a] != [r.prompt for r in c]


@pytest.mark.parametrize("name", WORKLOADS)
def test_sorted_arrivals_within_duration_unique_ids(name: str) -> None:
    spec = small(name)
    plan = generate(spec)
    ats = [r.at_s for r in plan]
    assert ats == sorted(ats)
    horizon = spec.duration_s + (spec.sessions_turns * spec.think_s if name == "multi-turn" else 0)
    assert ats[0] > 0 and ats[-1] < horizon
    assert [r.idx for r in plan] == list(range(len(plan)))
    assert all(r.max_tokens == spec.output_tokens for r in plan)


def test_shared_prefix_groups_share_exact_token_prefix() -> None:
    spec = small("shared-prefix", groups=3, system_tokens=300, question_tokens=40)
    plan = generate(spec)
    tok = Tokenizer()
    by_group: dict[str, list[list[int]]] = {}
    for r in plan:
        by_group.setdefault(r.group, []).append(tok.encode(r.prompt, False))
    assert set(by_group) == {"g0", "g1", "g2"}
    for ids in by_group.values():
        common = ids[0]
        for other in ids[1:]:
            n = 0
            while n < min(len(common), len(other)) and common[n] == other[n]:
                n += 1
            # The whole system prompt (~300 tokens) is shared; the question is not.
            assert 300 <= n < len(other)
    firsts = [ids[0][:50] for ids in by_group.values()]
    assert len({tuple(f) for f in firsts}) == 3  # groups differ early


def test_prompt_token_lengths_match_spec() -> None:
    spec = small("shared-prefix", system_tokens=1000, question_tokens=100)
    lens = [text_tokens(r.prompt) for r in generate(spec)[:20]]
    assert all(1090 <= n <= 1130 for n in lens), lens
    assert 199 <= text_tokens(words(__import__("random").Random(1), 200)) <= 201


def test_rate_matches_poisson_mean() -> None:
    import random

    arr = poisson_arrivals(random.Random(3), 50.0, 0.0, 100.0)
    assert 4700 < len(arr) < 5300
    assert all(0 <= a < 100 for a in arr)


def test_multi_turn_history_grows_within_session() -> None:
    spec = small("multi-turn", sessions_turns=4)
    plan = generate(spec)
    sessions: dict[str, list[tuple[int, str, float]]] = {}
    for r in plan:
        assert r.session is not None
        sessions.setdefault(r.session, []).append((r.turn, r.prompt, r.at_s))
    full = [s for s in sessions.values() if len(s) == 4]
    assert full
    for turns in full:
        turns.sort()
        for (_, p0, t0), (_, p1, t1) in itertools.pairwise(turns):
            assert p1.startswith(p0) and len(p1) > len(p0)
            assert t1 - t0 == pytest.approx(spec.think_s, abs=1e-5)


def test_ramp_phases_increase_rate() -> None:
    spec = small("ramp", ramp_rates=(5.0, 20.0), duration_s=20.0)
    plan = generate(spec)
    n0 = sum(1 for r in plan if r.phase == 0)
    n1 = sum(1 for r in plan if r.phase == 1)
    assert {r.rate for r in plan} == {5.0, 20.0}
    assert n1 > 2 * n0
    assert (
        max(r.at_s for r in plan if r.phase == 0)
        < 10.0
        <= min(r.at_s for r in plan if r.phase == 1)
    )


def test_headline_working_set_exceeds_one_endpoint() -> None:
    spec = default_spec("shared-prefix")
    shape = describe(spec, generate(replace(spec, duration_s=2.0)))
    assert shape["working_set_over_endpoint_kv"] > 1.0
    # ... but fits the fleet when each endpoint keeps its share of the groups.
    assert shape["working_set_tokens"] < spec.fleet.decode * spec.fleet.kv_tokens


def test_pd_default_has_prefill_servers() -> None:
    assert default_spec("pd").fleet.prefill >= 1
    assert default_spec("shared-prefix").fleet.prefill == 0


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"name": "nope"}, "workload"),
        ({"rate": 0.0}, "rate"),
        ({"groups": 0}, "groups"),
        ({"name": "ramp", "ramp_rates": ()}, "ramp_rates"),
    ],
)
def test_bad_specs_name_the_key(change: dict[str, object], key: str) -> None:
    spec = replace(WorkloadSpec(name="shared-prefix"), **change)  # type: ignore[arg-type]
    with pytest.raises(WorkloadError, match=key):
        generate(spec)


def test_request_json_round_trip() -> None:
    from pdroute.bench.workloads import BenchRequest

    r = generate(small("multi-turn"))[3]
    assert BenchRequest.from_json(r.to_json()) == r
