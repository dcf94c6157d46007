"""random-picker: uniform choice, ignoring scores (``maxNumOfEndpoints`` distinct)."""

from __future__ import annotations

from epp.datastore import EndpointView
from epp.scheduling.plugins._util import CountPicker
from epp.scheduling.registry import register
from epp.scheduling.types import CycleState, LLMRequest, ProfileRunResult


@register
class RandomPicker(CountPicker):
    type_name = "random-picker"

    def pick(
        self,
        cycle: CycleState,
        request: LLMRequest,
        endpoints: list[EndpointView],
        scores: list[float],
    ) -> ProfileRunResult:
        k = min(self.max_endpoints, len(endpoints))
        idx = self.rng.sample(range(len(endpoints)), k)
        return ProfileRunResult([endpoints[i] for i in idx], [scores[i] for i in idx])
