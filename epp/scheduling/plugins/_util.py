"""Shared pieces of the built-in plugins: parameterless construction, the pickers'
``maxNumOfEndpoints``, and the min-max normalization of the load scorers."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Self

from epp.config import Params
from epp.datastore import EndpointView
from epp.scheduling.registry import BuildContext
from epp.scheduling.types import Picker

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
