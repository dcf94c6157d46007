"""routed-load-scorer: a decayed count of the requests routed to each endpoint."""

from __future__ import annotations

import math
import random
from types import MappingProxyType

import pytest

from epp.config import ConfigError, load_config_text
from epp.datastore import Datastore, Endpoint, EndpointMetrics
from epp.scheduling import CycleState, LLMRequest, Pipeline, build_pipeline
from epp.scheduling.plugins.routed_load_scorer import RoutedLoadScorer

HEAD = "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\n"


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def setup(plugins: str, clock: Clock, n: int = 3) -> tuple[Datastore, Pipeline]:
    ds = Datastore(clock=clock, staleness_s=1e9)
    eps = [Endpoint(f"p{i}", f"10.4.0.{i}", 8000, labels=MappingProxyType({})) for i in range(n)]
    ds.replace_endpoints(eps)
    for e in eps:
        ds.update_metrics(e.key, EndpointMetrics(updated_at=clock.t))
    return ds, build_pipeline(load_config_text(HEAD + plugins), datastore=ds, rng=random.Random(0))


def route(pipe: Pipeline, ds: Datastore) -> str:
    req = LLMRequest("r", "m", prompt="hello")
    result, cycle = pipe.scheduler.schedule(req, list(ds.snapshot().endpoints))
    for h in pipe.pre_request:
        h.pre_request(cycle, req, result, {})
    return result.primary.targets[0].key


def test_spreads_picks_and_counts_decay_by_half_life() -> None:
    clock = Clock()
    ds, pipe = setup("plugins:\n- type: routed-load-scorer\n  parameters: {halfLife: 10s}\n", clock)
    scorer = pipe.plugins["routed-load-scorer"]
    assert isinstance(scorer, RoutedLoadScorer)
    picks = [route(pipe, ds) for _ in range(6)]
    # Alone in the profile it balances the counts exactly: two picks each.
    assert sorted(picks) == sorted([e.key for e in ds.endpoints()] * 2)
    key = picks[0]
    assert scorer.load(key) == pytest.approx(2.0)
    clock.t += 10.0  # one half-life
    assert scorer.load(key) == pytest.approx(1.0)
    clock.t += 20.0
    assert scorer.load(key) == pytest.approx(0.25)


def test_formula_is_min_max_of_decayed_counts() -> None:
    clock = Clock()
    ds, pipe = setup("plugins:\n- type: routed-load-scorer\n", clock)
    scorer = pipe.plugins["routed-load-scorer"]
    assert isinstance(scorer, RoutedLoadScorer)
    views = list(ds.snapshot().endpoints)
    # Nothing routed yet: every endpoint scores 1.
    assert list(scorer.score(CycleState(), LLMRequest("r", "m"), views)) == [1.0, 1.0, 1.0]
    # Counts 4 (30 s ago = one default half-life -> 2), 1 (now), 0.
    scorer._counts[views[0].key] = (4.0, clock.t - 30.0)
    scorer._counts[views[1].key] = (1.0, clock.t)
    scores = list(scorer.score(CycleState(), LLMRequest("r", "m"), views))
    assert scores == pytest.approx([0.0, 0.5, 1.0])
    assert scorer._rate == pytest.approx(math.log(2) / 30.0)


def test_removed_endpoints_are_forgotten() -> None:
    clock = Clock()
    ds, pipe = setup("plugins:\n- type: routed-load-scorer\n", clock)
    scorer = pipe.plugins["routed-load-scorer"]
    assert isinstance(scorer, RoutedLoadScorer)
    keys = {route(pipe, ds) for _ in range(3)}
    assert len(keys) == 3
    gone = sorted(keys)[0]
    ds.replace_endpoints([e for e in ds.endpoints() if e.key != gone])
    assert gone not in scorer._counts and scorer.load(gone) == 0.0


def test_bad_half_life_names_the_key() -> None:
    with pytest.raises(ConfigError, match=r"halfLife"):
        setup("plugins:\n- type: routed-load-scorer\n  parameters: {halfLife: 0s}\n", Clock())
    with pytest.raises(ConfigError, match=r"halfLife"):
        setup("plugins:\n- type: routed-load-scorer\n  parameters: {halfLife: soon}\n", Clock())
