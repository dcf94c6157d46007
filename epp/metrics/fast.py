"""Counters and histograms cheap enough for the per-request hot path.

``prometheus_client``'s ``Histogram.observe`` costs ~3 us (a lock and a Python
loop per bucket, two locked value updates) and ``Counter.inc`` ~1 us; one routed
request records about ten observations. These classes keep the same exposition
(they are ordinary registry collectors: ``_bucket``/``_count``/``_sum``/
``_created`` and ``_total``/``_created`` samples, same names, labels and ``le``
formatting) at ~0.3 us per observation: a child is a plain object whose
``observe`` is one ``bisect`` and two additions.

Invariant: a histogram child's ``_counts[i]`` is the number of observations ``v``
with ``bounds[i-1] < v <= bounds[i]`` (``bounds[-1]`` is ``+Inf``), so the
cumulative bucket values, the count and the ``+Inf`` bucket always agree.

Not thread-safe by design: every update and every scrape runs on the event loop
(``epp.server`` renders ``/metrics`` there). The label API is the subset the EPP
uses: ``labels(*values)`` / ``labels(**by_name)``, ``remove(*values)``,
``clear()``, and ``observe``/``inc`` on an unlabelled metric.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Iterable, Iterator, Sequence
from typing import Generic, TypeVar

from prometheus_client.metrics_core import Metric
from prometheus_client.registry import CollectorRegistry
from prometheus_client.utils import floatToGoString

_INF = float("inf")


class HistogramChild:
    """One label combination of a :class:`FastHistogram`."""

    __slots__ = ("_bounds", "_counts", "_sum", "created")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self._bounds = bounds
        self._counts = [0] * len(bounds)
        self._sum = 0.0
        self.created = time.time()

    def observe(self, amount: float) -> None:
        self._counts[bisect_left(self._bounds, amount)] += 1
        self._sum += amount

    @property
    def count(self) -> int:
        return sum(self._counts)

    @property
    def sum(self) -> float:
        return self._sum


def observe_intervals(children: Sequence[HistogramChild], marks: Sequence[float]) -> None:
    """``children[i].observe(marks[i + 1] - marks[i])`` for every child, in one call
    (the scheduler times consecutive plugin calls with one timestamp between them)."""
    for i, child in enumerate(children):
        amount = marks[i + 1] - marks[i]
        child._counts[bisect_left(child._bounds, amount)] += 1
        child._sum += amount


class CounterChild:
    """One label combination of a :class:`FastCounter`."""

    __slots__ = ("_total", "created")

    def __init__(self) -> None:
        self._total = 0.0
        self.created = time.time()

    def inc(self, amount: float = 1.0) -> None:
        if amount < 0:
            raise ValueError("counters can only be incremented by non-negative amounts")
        self._total += amount

    def get(self) -> float:
        return self._total


C = TypeVar("C", HistogramChild, CounterChild)


class _Family(Generic[C]):
    """Children by label values; registers itself as a collector."""

    _type = ""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        registry: CollectorRegistry | None,
    ) -> None:
        self._name = name
        self._doc = documentation
        self._labelnames = tuple(labelnames)
        self._children: dict[tuple[str, ...], C] = {}
        # An unlabelled metric is exposed from the start, as prometheus_client does.
        self._unlabelled: C | None = None if self._labelnames else self._new_child()
        if self._unlabelled is not None:
            self._children[()] = self._unlabelled
        if registry is not None:
            registry.register(self)  # type: ignore[arg-type]

    def _new_child(self) -> C:  # pragma: no cover - overridden
        raise NotImplementedError

    def labels(self, *values: object, **by_name: object) -> C:
        if by_name:
            if values:
                raise ValueError("pass label values by position or by name, not both")
            if set(by_name) != set(self._labelnames):
                raise ValueError(f"{self._name}: labels must be {self._labelnames}")
            values = tuple(by_name[n] for n in self._labelnames)
        if len(values) != len(self._labelnames) or not self._labelnames:
            raise ValueError(f"{self._name}: expected labels {self._labelnames}, got {values}")
        key = tuple(str(v) for v in values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self._new_child()
        return child

    def remove(self, *values: object) -> None:
        if len(values) != len(self._labelnames):
            raise ValueError(f"{self._name}: expected labels {self._labelnames}")
        del self._children[tuple(str(v) for v in values)]

    def clear(self) -> None:
        self._children = {} if self._unlabelled is None else {(): self._unlabelled}

    def _labels_of(self, key: tuple[str, ...]) -> dict[str, str]:
        return dict(zip(self._labelnames, key, strict=True))

    def describe(self) -> Iterable[Metric]:
        return [Metric(self._name, self._doc, self._type)]

    def collect(self) -> Iterable[Metric]:  # pragma: no cover - overridden
        raise NotImplementedError


class FastHistogram(_Family[HistogramChild]):
    """A histogram with ``prometheus_client.Histogram``'s exposition (see module doc)."""

    _type = "histogram"

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str] = (),
        *,
        buckets: Sequence[float],
        registry: CollectorRegistry | None = None,
    ) -> None:
        bounds = [float(b) for b in buckets]
        if bounds != sorted(bounds) or len(set(bounds)) != len(bounds):
            raise ValueError("buckets must be strictly increasing")
        if not bounds or bounds[-1] != _INF:
            bounds.append(_INF)
        self._bounds = tuple(bounds)
        self._le = tuple(str(floatToGoString(b)) for b in bounds)  # type: ignore[no-untyped-call]
        super().__init__(name, documentation, labelnames, registry)

    def _new_child(self) -> HistogramChild:
        return HistogramChild(self._bounds)

    def observe(self, amount: float) -> None:
        """Observe on the unlabelled histogram (labelled ones: ``labels(...).observe``)."""
        child = self._unlabelled
        if child is None:
            raise ValueError(f"{self._name} has labels; use labels(...).observe()")
        child.observe(amount)

    def collect(self) -> Iterator[Metric]:
        m = Metric(self._name, self._doc, "histogram")
        name = self._name
        for key, child in list(self._children.items()):
            labels = self._labels_of(key)
            acc = 0
            for le, n in zip(self._le, list(child._counts), strict=True):
                acc += n
                m.add_sample(f"{name}_bucket", {**labels, "le": le}, float(acc))
            m.add_sample(f"{name}_count", labels, float(acc))
            m.add_sample(f"{name}_sum", labels, child._sum)
            m.add_sample(f"{name}_created", labels, child.created)
        yield m


class FastCounter(_Family[CounterChild]):
    """A counter with ``prometheus_client.Counter``'s exposition (see module doc)."""

    _type = "counter"

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str] = (),
        *,
        registry: CollectorRegistry | None = None,
    ) -> None:
        if name.endswith("_total"):
            name = name[: -len("_total")]
        super().__init__(name, documentation, labelnames, registry)

    def _new_child(self) -> CounterChild:
        return CounterChild()

    def inc(self, amount: float = 1.0) -> None:
        child = self._unlabelled
        if child is None:
            raise ValueError(f"{self._name} has labels; use labels(...).inc()")
        child.inc(amount)

    def collect(self) -> Iterator[Metric]:
        m = Metric(self._name, self._doc, "counter")
        for key, child in list(self._children.items()):
            labels = self._labels_of(key)
            m.add_sample(f"{self._name}_total", labels, child._total)
            m.add_sample(f"{self._name}_created", labels, child.created)
        yield m
