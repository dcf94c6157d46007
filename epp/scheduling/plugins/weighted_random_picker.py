"""weighted-random-picker: pick with probability proportional to score (A-Res).

Each endpoint with score ``w > 0`` draws ``key = U ** (1 / w)``, ``U`` uniform in
(0, 1); the largest keys win (Efraimidis-Spirakis A-Res, a weighted sample without
replacement). Endpoints scoring 0 come after all others, in random order, so when
every score is 0 the choice is uniform.
"""

from __future__ import annotations

import random
from typing import Self

from epp.config import Params
from epp.datastore import EndpointView
from epp.scheduling.registry import BuildContext, register
from epp.scheduling.types import CycleState, LLMRequest, Picker, ProfileRunResult


@register
class WeightedRandomPicker(Picker):
    type_name = "weighted-random-picker"

    def __init__(self, name: str, rng: random.Random, max_endpoints: int = 1) -> None:
        self.name = name
        self.rng = rng
        self.max_endpoints = max_endpoints

    @classmethod
    def from_params(cls, name: str, params: Params, ctx: BuildContext) -> Self:
        n = params.get_int("maxNumOfEndpoints", 1, min_value=1, max_value=64)
        params.finish()
        return cls(name, ctx.rng, n)

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
