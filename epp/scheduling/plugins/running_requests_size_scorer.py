"""running-requests-size-scorer: prefer endpoints with fewer running requests (min-max)."""

from __future__ import annotations

from collections.abc import Sequence

from epp.datastore import EndpointView
from epp.scheduling.plugins._util import NoParams, min_max_scores
from epp.scheduling.registry import register
from epp.scheduling.types import CycleState, LLMRequest, Scorer


@register
class RunningRequestsSizeScorer(NoParams, Scorer):
    type_name = "running-requests-size-scorer"

    def score(
        self, cycle: CycleState, request: LLMRequest, endpoints: list[EndpointView]
    ) -> Sequence[float]:
        return min_max_scores(endpoints, lambda e: e.metrics.running)
