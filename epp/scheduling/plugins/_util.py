"""Shared helpers for the load scorers."""

from __future__ import annotations

from collections.abc import Callable

from epp.datastore import EndpointView


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
