"""kv-cache-utilization-scorer: ``1 - kv_cache_usage`` (stale endpoints score 0)."""

from __future__ import annotations

from collections.abc import Sequence

from epp.datastore import EndpointView
from epp.scheduling.plugins._util import NoParams
from epp.scheduling.registry import register
from epp.scheduling.types import CycleState, LLMRequest, Scorer


@register
class KVCacheUtilizationScorer(NoParams, Scorer):
    type_name = "kv-cache-utilization-scorer"

    def score(
        self, cycle: CycleState, request: LLMRequest, endpoints: list[EndpointView]
    ) -> Sequence[float]:
        return [0.0 if e.stale else 1.0 - e.metrics.kv_cache_usage for e in endpoints]
