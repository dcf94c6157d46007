"""random-picker: uniform choice, ignoring scores (``maxNumOfEndpoints`` distinct)."""

from __future__ import annotations

import random
from typing import Self

from epp.config import Params
from epp.datastore import EndpointView
from epp.scheduling.registry import BuildContext, register
from epp.scheduling.types import CycleState, LLMRequest, Picker, ProfileRunResult


@register
class RandomPicker(Picker):
    type_name = "random-picker"

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
        k = min(self.max_endpoints, len(endpoints))
        idx = self.rng.sample(range(len(endpoints)), k)
        return ProfileRunResult([endpoints[i] for i in idx], [scores[i] for i in idx])
