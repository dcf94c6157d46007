"""utilization-detector: pool saturation from queue depth and KV-cache use.

Per endpoint ``max(waiting / queueDepthThreshold, kv / kvCacheUtilThreshold)``;
endpoints with stale or missing metrics count as saturated (1.0). The pool's
saturation is the average over endpoints (1.0 for an empty pool). Request control
sheds requests with priority < 0 while saturation >= 1.0.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Self

from epp.config import Params
from epp.datastore import EndpointView
from epp.scheduling.registry import BuildContext, register
from epp.scheduling.types import SaturationDetector


@register
class UtilizationDetector(SaturationDetector):
    type_name = "utilization-detector"

    def __init__(self, name: str, *, queue_depth: int = 5, kv_util: float = 0.8) -> None:
        self.name = name
        self.queue_depth = queue_depth
        self.kv_util = kv_util

    @classmethod
    def from_params(cls, name: str, params: Params, ctx: BuildContext) -> Self:
        q = params.get_int("queueDepthThreshold", 5, min_value=1)
        kv = params.get_float(
            "kvCacheUtilThreshold", 0.8, min_value=0.0, max_value=1.0, exclusive_min=True
        )
        # Staleness comes from the datastore (--metrics-staleness-threshold); accepted here.
        params.get_any("metricsStalenessThreshold")
        params.finish()
        return cls(name, queue_depth=q, kv_util=kv)

    def endpoint_saturation(self, e: EndpointView) -> float:
        if e.stale:
            return 1.0
        m = e.metrics
        return max(m.waiting / self.queue_depth, m.kv_cache_usage / self.kv_util)

    def saturation(self, endpoints: Sequence[EndpointView]) -> float:
        if not endpoints:
            return 1.0
        return sum(self.endpoint_saturation(e) for e in endpoints) / len(endpoints)
