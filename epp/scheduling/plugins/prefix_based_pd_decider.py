"""prefix-based-pd-decider: disaggregate when enough of the prompt is not cached.

``uncached = prompt_tokens - cached_tokens(decode endpoint)`` where cached tokens
come from the prefix-match producer (matched blocks x block tokens) and prompt
tokens from a tokenizer count when available, else ``ceil(chars / 4)``.
Disaggregate iff ``nonCachedTokens > 0``, ``prompt_tokens >= promptTokens`` and
``uncached >= nonCachedTokens``. As in llm-d, ``nonCachedTokens: 0`` (the default)
turns disaggregation off, and a request without prefix-match information stays
decode-only. The producer is ``prefixMatchInfoProducerName``, else the one prefix
producer configured, else an implicit ``approx-prefix-cache-producer`` (llm-d
creates producers for consumers the same way).
"""

from __future__ import annotations

from typing import Self

from epp.config import Params
from epp.datastore import EndpointView
from epp.scheduling.registry import BuildContext, register
from epp.scheduling.types import CycleState, Decider, LLMRequest, PrefixMatchProducer


@register
class PrefixBasedPDDecider(Decider):
    type_name = "prefix-based-pd-decider"

    def __init__(
        self,
        name: str,
        *,
        non_cached_tokens: int = 0,
        prompt_tokens: int = 0,
        producer: PrefixMatchProducer | None = None,
    ) -> None:
        self.name = name
        self.non_cached_tokens = non_cached_tokens
        self.prompt_tokens = prompt_tokens
        self.producer = producer

    @classmethod
    def from_params(cls, name: str, params: Params, ctx: BuildContext) -> Self:
        non_cached = params.get_int("nonCachedTokens", 0, min_value=0)
        prompt = params.get_int("promptTokens", 0, min_value=0)
        key = params.key_path("prefixMatchInfoProducerName")
        producer_name = params.get_str("prefixMatchInfoProducerName", "") or None
        params.finish()
        producer = ctx.prefix_producer(producer_name, key=key)
        return cls(name, non_cached_tokens=non_cached, prompt_tokens=prompt, producer=producer)

    def disaggregate(
        self, cycle: CycleState, request: LLMRequest, decode: EndpointView
    ) -> tuple[bool, str]:
        if self.non_cached_tokens <= 0:
            return False, "disabled"
        tokens = request.estimated_prompt_tokens
        if tokens < self.prompt_tokens:
            return False, "short-prompt"
        info = self.producer.match_info(cycle) if self.producer is not None else cycle.prefix_match
        if info is None:
            return False, "no-prefix-info"
        cached = info.cached_tokens(decode.key, tokens)
        uncached = tokens - cached
        if uncached <= 0:
            return False, "fully-cached"
        if uncached < self.non_cached_tokens:
            return False, "cached" if cached else "short-prompt"
        return True, "uncached-prefix"
