"""inflight-load-producer with active-request-scorer and token-load-scorer."""

from __future__ import annotations

import random
from types import MappingProxyType

import pytest

from epp.config import ConfigError, load_config_text
from epp.datastore import Datastore, Endpoint, EndpointMetrics
from epp.scheduling import LLMRequest, Pipeline, build_pipeline

HEAD = "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\n"


class Clock:
    def __init__(self) -> None:
        self.t = 10.0

    def __call__(self) -> float:
        return self.t


def setup(plugins: str, clock: Clock, n: int = 3) -> tuple[Datastore, Pipeline]:
    ds = Datastore(clock=clock, staleness_s=1e9)
    eps = [Endpoint(f"p{i}", f"10.2.0.{i}", 8000, labels=MappingProxyType({})) for i in range(n)]
    ds.replace_endpoints(eps)
    for e in eps:
        ds.update_metrics(e.key, EndpointMetrics(updated_at=clock.t))
    return ds, build_pipeline(load_config_text(HEAD + plugins), datastore=ds, rng=random.Random(0))


def route(pipe: Pipeline, ds: Datastore, prompt: str = "hi") -> tuple[str, object]:
    req = LLMRequest("r", "m", prompt=prompt)
    result, cycle = pipe.scheduler.schedule(req, list(ds.snapshot().endpoints))
    for h in pipe.pre_request:
        h.pre_request(cycle, req, result, {})
    return result.primary.targets[0].key, (cycle, req, result)


def finish(pipe: Pipeline, ctx: object) -> None:
    cycle, req, result = ctx  # type: ignore[misc]
    for h in pipe.response_complete:
        h.response_complete(cycle, req, result, None, 200)


def test_active_request_scorer_spreads_in_flight_requests() -> None:
    clock = Clock()
    ds, pipe = setup("plugins:\n- type: active-request-scorer\n", clock)
    producer = pipe.plugins["inflight-load-producer"]  # created implicitly
    picks = [route(pipe, ds) for _ in range(6)]
    # Nothing finished: every endpoint got exactly two requests.
    assert producer.requests == {"10.2.0.0:8000": 2, "10.2.0.1:8000": 2, "10.2.0.2:8000": 2}  # type: ignore[attr-defined]
    for _, ctx in picks:
        finish(pipe, ctx)
        finish(pipe, ctx)  # completing twice releases once
    assert producer.requests == {} and len(producer) == 0  # type: ignore[arg-type, attr-defined]


def test_active_request_scorer_formula() -> None:
    clock = Clock()
    ds, pipe = setup(
        "plugins:\n- type: active-request-scorer\n  parameters: {idleThreshold: 1, maxBusyScore: 0.5}\n",
        clock,
        n=4,
    )
    producer = pipe.plugins["inflight-load-producer"]
    producer.requests.update({"10.2.0.1:8000": 1, "10.2.0.2:8000": 3, "10.2.0.3:8000": 5})  # type: ignore[attr-defined]
    scorer = pipe.plugins["active-request-scorer"]
    views = list(ds.snapshot().endpoints)
    # idle (<= 1) -> 1.0; busy -> 0.5 * (5 - c) / (5 - 1)
    assert list(scorer.score(None, LLMRequest("r", "m"), views)) == [1.0, 1.0, 0.25, 0.0]  # type: ignore[attr-defined, arg-type]


def test_token_load_scorer_formula_and_timeout_and_purge() -> None:
    clock = Clock()
    ds, pipe = setup(
        "plugins:\n- type: inflight-load-producer\n  parameters: {requestTimeout: 30s}\n"
        "- type: token-load-scorer\n  parameters: {queueThresholdTokens: 1000}\n",
        clock,
        n=2,
    )
    producer = pipe.plugins["inflight-load-producer"]
    assert pipe.plugins["token-load-scorer"].producer is producer  # type: ignore[attr-defined]
    first, _ = route(pipe, ds, "x" * 2000)  # 500 tokens
    second, _ = route(pipe, ds, "y" * 400)  # 100 tokens, goes to the other endpoint
    assert first != second
    assert producer.tokens == {first: 500, second: 100}  # type: ignore[attr-defined]
    scorer = pipe.plugins["token-load-scorer"]
    views = list(ds.snapshot().endpoints)
    by_key = dict(
        zip([v.key for v in views], scorer.score(None, LLMRequest("r", "m"), views), strict=True)
    )  # type: ignore[attr-defined, arg-type]
    assert by_key == {first: 0.5, second: 0.9}
    # After the timeout the (never completed) entries expire on the next cycle.
    clock.t += 31
    route(pipe, ds)
    assert sum(producer.requests.values()) == 1  # type: ignore[attr-defined]
    # An endpoint leaving the pool is purged.
    ds.replace_endpoints([e for e in ds.endpoints() if e.key == first])
    assert second not in producer.requests  # type: ignore[attr-defined]


def test_request_timeout_must_be_a_duration() -> None:
    with pytest.raises(
        ConfigError, match=r"plugins\[0\].parameters.requestTimeout: expected a duration"
    ):
        setup(
            "plugins:\n- type: inflight-load-producer\n  parameters: {requestTimeout: soon}\n",
            Clock(),
        )
