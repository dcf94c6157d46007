"""active-request-scorer: prefer endpoints with fewer requests in flight from this EPP.

Counts come from ``inflight-load-producer`` (created implicitly when not configured).
``c <= idleThreshold`` scores 1.0; busier endpoints score
``maxBusyScore x (max_c - c) / (max_c - idleThreshold)``, so the busiest scores 0.
Unlike the queue scorer this reacts at once, without waiting for the next scrape.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Self

from epp.config import Params
from epp.datastore import EndpointView
from epp.scheduling.plugins.inflight_load_producer import InflightLoadProducer, parse_duration
from epp.scheduling.registry import BuildContext, register
from epp.scheduling.types import CycleState, LLMRequest, Scorer


@register
class ActiveRequestScorer(Scorer):
    type_name = "active-request-scorer"

    def __init__(
        self, name: str, producer: InflightLoadProducer, *, idle: int = 0, max_busy: float = 1.0
    ) -> None:
        self.name = name
        self.producer = producer
        self.idle = idle
        self.max_busy = max_busy

    @classmethod
    def from_params(cls, name: str, params: Params, ctx: BuildContext) -> Self:
        idle = params.get_int("idleThreshold", 0, min_value=0)
        max_busy = params.get_float("maxBusyScore", 1.0, min_value=0.0, max_value=1.0)
        parse_duration(params, "requestTimeout", 300.0)  # accepted; the producer's applies
        producer = InflightLoadProducer.for_consumer(params, ctx)
        params.finish()
        return cls(name, producer, idle=idle, max_busy=max_busy)

    def score(
        self, cycle: CycleState, request: LLMRequest, endpoints: list[EndpointView]
    ) -> Sequence[float]:
        counts = self.producer.requests
        cs = [counts.get(e.key, 0) for e in endpoints]
        idle = self.idle
        top = max(cs, default=0)
        if top <= idle:
            return [1.0] * len(cs)
        span = top - idle
        mb = self.max_busy
        return [1.0 if c <= idle else mb * (top - c) / span for c in cs]
