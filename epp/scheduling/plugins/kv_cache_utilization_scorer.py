"""kv-cache-utilization-scorer: ``1 - kv_cache_usage`` (stale endpoints score 0).

Scores are clamped to [0, 1] here (NaN -> 0), exactly as the runner clamps any
scorer's output, so the runner can add them as they are (``unit_scores``).

The scores depend only on the candidate views, which are immutable and shared
by every request until the datastore's snapshot changes; the scores of the last
two candidate lists are kept (``ListMemo``), and an equal list gets the same tuple.
"""

from __future__ import annotations

from collections.abc import Sequence

from epp.datastore import EndpointView
from epp.scheduling.plugins._util import ListMemo, NoParams
from epp.scheduling.registry import register
from epp.scheduling.types import CycleState, LLMRequest, Scorer


@register
class KVCacheUtilizationScorer(NoParams, Scorer):
    type_name = "kv-cache-utilization-scorer"
    unit_scores = True

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self._memo: ListMemo[tuple[float, ...]] = ListMemo()

    def score(
        self, cycle: CycleState, request: LLMRequest, endpoints: list[EndpointView]
    ) -> Sequence[float]:
        got = self._memo.get(endpoints)
        if got is not None:
            return got
        out = tuple(
            0.0
            if e.stale
            else ((s if s < 1.0 else 1.0) if (s := 1.0 - e.metrics.kv_cache_usage) > 0.0 else 0.0)
            for e in endpoints
        )
        self._memo.put(endpoints, out)
        return out
