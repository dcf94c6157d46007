"""queue-scorer: prefer endpoints with fewer waiting requests (min-max normalized)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Self

from epp.config import Params
from epp.datastore import EndpointView
from epp.scheduling.plugins._util import min_max_scores
from epp.scheduling.registry import BuildContext, register
from epp.scheduling.types import CycleState, LLMRequest, Scorer


@register
class QueueScorer(Scorer):
    type_name = "queue-scorer"

    def __init__(self, name: str) -> None:
        self.name = name

    @classmethod
    def from_params(cls, name: str, params: Params, ctx: BuildContext) -> Self:
        params.finish()
        return cls(name)

    def score(
        self, cycle: CycleState, request: LLMRequest, endpoints: list[EndpointView]
    ) -> Sequence[float]:
        return min_max_scores(endpoints, lambda e: e.metrics.waiting)
