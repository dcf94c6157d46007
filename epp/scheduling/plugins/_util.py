"""Shared pieces of the built-in plugins: parameterless construction, the pickers'
``maxNumOfEndpoints``, the min-max normalization of the load scorers, and which
endpoints a routed request's prefix is credited to (the prefix-cache producers)."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from operator import itemgetter
from typing import Any, Generic, Self, TypeVar

from epp.config import Params
from epp.datastore import Datastore, EndpointView
from epp.scheduling.registry import BuildContext
from epp.scheduling.types import Picker, SchedulingResult

V = TypeVar("V")

#: Upper bound of ``maxNumOfEndpoints`` (fallbacks sent to the proxy).
MAX_ENDPOINTS = 64


class NoParams:
    """Mixin for plugins without parameters: ``cls(name)``; any parameter is an error."""

    def __init__(self, name: str) -> None:
        self.name = name

    @classmethod
    def from_params(cls, name: str, params: Params, ctx: BuildContext) -> Self:
        params.finish()
        return cls(name)


class CountPicker(Picker):
    """Base of the pickers: the shared rng and ``maxNumOfEndpoints`` (default 1)."""

    def __init__(self, name: str, rng: random.Random, max_endpoints: int = 1) -> None:
        self.name = name
        self.rng = rng
        self.max_endpoints = max_endpoints

    @classmethod
    def from_params(cls, name: str, params: Params, ctx: BuildContext) -> Self:
        n = params.get_int("maxNumOfEndpoints", 1, min_value=1, max_value=MAX_ENDPOINTS)
        params.finish()
        return cls(name, ctx.rng, n)


class ListMemo(Generic[V]):
    """A value for each of the last two candidate lists seen, compared by value.

    For values that are a function of the candidate views alone (views are
    immutable; equal views give equal values). Two slots, because a P/D config
    runs the same plugin instance in two profiles with different candidates.

    Invariant: each slot holds a private copy of the list its value was computed
    for (a caller changing its list later cannot make a stale value match).
    """

    __slots__ = ("_slots",)

    def __init__(self) -> None:
        self._slots: list[tuple[list[EndpointView], V]] = []

    def get(self, endpoints: list[EndpointView]) -> V | None:
        for seen, value in self._slots:
            if seen == endpoints:
                return value
        return None

    def put(self, endpoints: list[EndpointView], value: V) -> None:
        self._slots = [(list(endpoints), value), *self._slots[:1]]


class CandidateKeys:
    """The candidates' keys as one ``operator.itemgetter``: ``of(endpoints)(d)`` is
    ``tuple(d[e.key] for e in endpoints)`` in one C call (KeyError when one is
    missing); ``keys`` then lists those keys. Built once per candidate list (see
    :class:`ListMemo`). Needs at least two candidates (an itemgetter of one key
    returns the value, not a tuple).
    """

    __slots__ = ("_memo", "keys")

    def __init__(self) -> None:
        self._memo: ListMemo[tuple[Callable[[Any], tuple[Any, ...]], list[str]]] = ListMemo()
        #: The keys of the last list given to :meth:`of` (read-only).
        self.keys: list[str] = []

    def of(self, endpoints: list[EndpointView]) -> Callable[[Any], tuple[Any, ...]]:
        got = self._memo.get(endpoints)
        if got is None:
            if len(endpoints) < 2:
                raise ValueError("CandidateKeys needs at least two candidates")
            keys = [e.key for e in endpoints]
            got = (itemgetter(*keys), keys)
            self._memo.put(endpoints, got)
        self.keys = got[1]
        return got[0]


def min_max_scores(
    endpoints: list[EndpointView], value: Callable[[EndpointView], float]
) -> list[float]:
    """``(max - v) / (max - min)`` over fresh endpoints; 1.0 each when all are equal.

    Stale endpoints (metrics missing or old) score 0, the worst, and do not take
    part in the min/max.
    """
    vals = [None if e.stale else value(e) for e in endpoints]
    fresh = [v for v in vals if v is not None]
    if not fresh:
        return [0.0] * len(endpoints)
    lo = min(fresh)
    hi = max(fresh)
    if hi == lo:
        return [0.0 if v is None else 1.0 for v in vals]
    span = hi - lo
    return [0.0 if v is None else (hi - v) / span for v in vals]


def _in_pool(datastore: Datastore | None, endpoint: str) -> bool:
    return datastore is None or datastore.get(endpoint) is not None


def routed_endpoints(result: SchedulingResult, datastore: Datastore | None) -> Iterator[str]:
    """The endpoints a just-routed request will (probably) leave its prefix on.

    The primary profile's first target, then each other profile's first target
    (the prefill endpoint of a P/D request) that differs from it; only current
    pool members (all of them when ``datastore`` is None).
    """
    primary = result.primary.targets[0].key
    if _in_pool(datastore, primary):
        yield primary
    for name, r in result.profile_results.items():
        if name == result.primary_profile or r is None or not r.targets:
            continue
        key = r.targets[0].key
        if key != primary and _in_pool(datastore, key):
            yield key


def served_elsewhere(
    result: SchedulingResult, served: str | None, status: int | None, datastore: Datastore | None
) -> str | None:
    """The endpoint that served a request successfully when it was not the primary pick
    (the proxy fell back), if it is a pool member; else None."""
    if served is None or served == result.primary.targets[0].key:
        return None
    if status is not None and status >= 400:
        return None
    return served if _in_pool(datastore, served) else None
