"""epp.metrics.fast: same exposition as prometheus_client, checked side by side."""

from __future__ import annotations

import re

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from epp.metrics.fast import FastCounter, FastHistogram

BUCKETS = (0.00005, 0.0001, 0.001, 0.01, 0.5, 1.0)
VALUES = [0.0, 0.00005, 0.00007, 0.0001, 0.0002, 0.001, 0.3, 0.5, 1.0, 2.0, 1e9, -1.0]


def _text(registry: CollectorRegistry) -> str:
    """Exposition without the ``_created`` timestamps (they differ by creation time)."""
    lines = generate_latest(registry).decode().splitlines()
    return "\n".join(line for line in lines if not re.match(r"^\w+_created\{?", line))


def test_histogram_exposition_matches_prometheus_client() -> None:
    ref_reg, fast_reg = CollectorRegistry(), CollectorRegistry()
    ref = Histogram("h_seconds", "doc", ["a", "b"], buckets=BUCKETS, registry=ref_reg)
    fast = FastHistogram("h_seconds", "doc", ["a", "b"], buckets=BUCKETS, registry=fast_reg)
    ref1 = Histogram("u_seconds", "doc", buckets=BUCKETS, registry=ref_reg)
    fast1 = FastHistogram("u_seconds", "doc", buckets=BUCKETS, registry=fast_reg)
    assert _text(ref_reg) == _text(fast_reg)  # unlabelled: exposed before any observation
    for i, v in enumerate(VALUES):
        ref.labels("x", str(i % 3)).observe(v)
        fast.labels("x", str(i % 3)).observe(v)
        ref1.observe(v)
        fast1.observe(v)
    ref.labels(a="y", b="k").observe(0.2)
    fast.labels(a="y", b="k").observe(0.2)
    assert _text(ref_reg) == _text(fast_reg)
    labels = {"a": "x", "b": "0"}
    assert fast_reg.get_sample_value("h_seconds_count", labels) == ref_reg.get_sample_value(
        "h_seconds_count", labels
    )
    assert fast_reg.get_sample_value("h_seconds_created", labels) is not None
    ref.remove("x", "1")
    fast.remove("x", "1")
    assert _text(ref_reg) == _text(fast_reg)
    with pytest.raises(KeyError):
        fast.remove("x", "1")


def test_counter_exposition_matches_prometheus_client() -> None:
    ref_reg, fast_reg = CollectorRegistry(), CollectorRegistry()
    ref = Counter("c", "doc", ["k"], registry=ref_reg)
    fast = FastCounter("c", "doc", ["k"], registry=fast_reg)
    ref1 = Counter("u_total", "doc", registry=ref_reg)
    fast1 = FastCounter("u_total", "doc", registry=fast_reg)
    for i in range(7):
        ref.labels(str(i % 2)).inc()
        fast.labels(str(i % 2)).inc()
        ref1.inc(0.5)
        fast1.inc(0.5)
    assert _text(ref_reg) == _text(fast_reg)
    assert fast.labels("0").get() == 4
    with pytest.raises(ValueError):
        fast.labels("0").inc(-1)
    fast.clear()
    ref.clear()
    assert _text(ref_reg) == _text(fast_reg)


def test_label_mistakes_are_errors() -> None:
    h = FastHistogram("m_seconds", "doc", ["a"], buckets=BUCKETS)
    with pytest.raises(ValueError):
        h.labels("x", "y")
    with pytest.raises(ValueError):
        h.labels(b="x")
    with pytest.raises(ValueError):
        h.observe(1.0)  # labelled: needs labels()
    with pytest.raises(ValueError):
        FastHistogram("bad", "doc", buckets=(1.0, 0.5))


def test_observe_intervals_equals_one_observe_per_child() -> None:
    from epp.metrics.fast import observe_intervals

    a = FastHistogram("t_a", "a", ["p"], buckets=(0.001, 0.01, 0.1))
    b = FastHistogram("t_b", "b", ["p"], buckets=(0.001, 0.01, 0.1))
    marks = [10.0, 10.0005, 10.0505, 10.0505, 12.0]  # intervals 0.0005, 0.05, 0, 1.9495
    kids_a = [a.labels(str(i)) for i in range(4)]
    kids_b = [b.labels(str(i)) for i in range(4)]
    observe_intervals(kids_a, marks)
    for i, child in enumerate(kids_b):
        child.observe(marks[i + 1] - marks[i])
    for ca, cb in zip(kids_a, kids_b, strict=True):
        assert ca._counts == cb._counts and ca.sum == cb.sum and ca.count == 1
    assert [c._counts.index(1) for c in kids_a] == [0, 2, 0, 3]  # le 0.001, 0.1, 0.001, +Inf
