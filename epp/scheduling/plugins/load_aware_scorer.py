"""load-aware-scorer (llm-d): 0.5 for an empty queue, falling linearly to 0 at ``threshold``.

``score = 0.5 * (1 - min(q, threshold) / threshold)``; the maximum is deliberately
0.5 so an idle endpoint does not dominate affinity scorers. Stale endpoints score 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Self

from epp.config import Params
from epp.datastore import EndpointView
from epp.scheduling.registry import BuildContext, register
from epp.scheduling.types import CycleState, LLMRequest, Scorer


@register
class LoadAwareScorer(Scorer):
    type_name = "load-aware-scorer"

    def __init__(self, name: str, threshold: int = 128) -> None:
        self.name = name
        self.threshold = threshold

    @classmethod
    def from_params(cls, name: str, params: Params, ctx: BuildContext) -> Self:
        threshold = params.get_int("threshold", 128, min_value=1)
        params.finish()
        return cls(name, threshold)

    def score(
        self, cycle: CycleState, request: LLMRequest, endpoints: list[EndpointView]
    ) -> Sequence[float]:
        t = self.threshold
        out = []
        for e in endpoints:
            q = e.metrics.waiting
            if e.stale or q >= t:
                out.append(0.0)
            else:
                out.append(0.5 * (1.0 - max(q, 0) / t))
        return out
