"""token-producer: the prompt's token count for deciders, as an estimate.

Sets ``request.prompt_tokens = ceil(len(prompt) / charsPerToken)`` unless a count
is already known (token-id prompts, or a tokenizing producer that ran first).
Precise tokenization belongs to the precise prefix producer, which sets
``request.token_ids`` and ``prompt_tokens`` itself.
"""

from __future__ import annotations

import math
from typing import Self

from epp.config import Params
from epp.datastore import EndpointView
from epp.scheduling.registry import BuildContext, register
from epp.scheduling.types import CHARS_PER_TOKEN, CycleState, LLMRequest, Producer


@register
class TokenProducer(Producer):
    type_name = "token-producer"

    def __init__(self, name: str, chars_per_token: float = CHARS_PER_TOKEN) -> None:
        self.name = name
        self.chars_per_token = chars_per_token

    @classmethod
    def from_params(cls, name: str, params: Params, ctx: BuildContext) -> Self:
        cpt = params.get_float("charsPerToken", CHARS_PER_TOKEN, min_value=0.0, exclusive_min=True)
        params.finish()
        return cls(name, cpt)

    def produce(
        self, cycle: CycleState, request: LLMRequest, endpoints: list[EndpointView]
    ) -> None:
        if request.prompt_tokens is None:
            request.prompt_tokens = math.ceil(len(request.prompt) / self.chars_per_token)
