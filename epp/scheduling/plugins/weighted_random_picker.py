"""weighted-random-picker: pick with probability proportional to score (A-Res).

Each endpoint with score ``w > 0`` draws ``key = U ** (1 / w)``, ``U`` uniform in
(0, 1); the largest keys win (Efraimidis-Spirakis A-Res, a weighted sample without
replacement). Endpoints scoring 0 come after all others, in random order, so when
every score is 0 the choice is uniform.
"""

from __future__ import annotations

from epp.datastore import EndpointView
from epp.scheduling.plugins._util import CountPicker
from epp.scheduling.registry import register
from epp.scheduling.types import CycleState, LLMRequest, ProfileRunResult


@register
class WeightedRandomPicker(CountPicker):
    type_name = "weighted-random-picker"

    def pick(
        self,
        cycle: CycleState,
        request: LLMRequest,
        endpoints: list[EndpointView],
        scores: list[float],
    ) -> ProfileRunResult:
        rnd = self.rng.random
        keys = []
        for i, w in enumerate(scores):
            u = rnd() or 1e-300  # U in (0, 1)
            key = u ** (1.0 / w) if w > 0 else -u  # zero weights sort after every positive
            keys.append((key, i))
        keys.sort(reverse=True)
        top = [i for _, i in keys[: self.max_endpoints]]
        return ProfileRunResult([endpoints[i] for i in top], [scores[i] for i in top])
