"""max-score-picker: the highest total score wins; ties are broken at random.

With ``maxNumOfEndpoints > 1`` the next best follow as fallbacks (best first).
"""

from __future__ import annotations

from epp.datastore import EndpointView
from epp.scheduling.plugins._util import CountPicker
from epp.scheduling.registry import register
from epp.scheduling.types import CycleState, LLMRequest, ProfileRunResult


@register
class MaxScorePicker(CountPicker):
    type_name = "max-score-picker"

    def pick(
        self,
        cycle: CycleState,
        request: LLMRequest,
        endpoints: list[EndpointView],
        scores: list[float],
    ) -> ProfileRunResult:
        n = len(endpoints)
        if n == 0:
            return ProfileRunResult([])
        if self.max_endpoints == 1:
            best = max(scores)
            ties = [i for i in range(n) if scores[i] == best]
            i = ties[0] if len(ties) == 1 else self.rng.choice(ties)
            return ProfileRunResult([endpoints[i]], [scores[i]])
        order = list(range(n))
        self.rng.shuffle(order)
        order.sort(key=scores.__getitem__, reverse=True)  # stable: shuffled ties stay random
        top = order[: self.max_endpoints]
        return ProfileRunResult([endpoints[i] for i in top], [scores[i] for i in top])
