"""token-load-scorer: ``1 - min(1, inflight_prompt_tokens / queueThresholdTokens)``.

In-flight prompt tokens per endpoint come from ``inflight-load-producer`` (created
implicitly when not configured).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Self

from epp.config import Params
from epp.datastore import EndpointView
from epp.scheduling.plugins.inflight_load_producer import InflightLoadProducer
from epp.scheduling.registry import BuildContext, register
from epp.scheduling.types import CycleState, LLMRequest, Scorer


@register
class TokenLoadScorer(Scorer):
    type_name = "token-load-scorer"

    def __init__(
        self, name: str, producer: InflightLoadProducer, *, threshold: int = 4_194_304
    ) -> None:
        self.name = name
        self.producer = producer
        self.threshold = threshold

    @classmethod
    def from_params(cls, name: str, params: Params, ctx: BuildContext) -> Self:
        threshold = params.get_int("queueThresholdTokens", 4_194_304, min_value=1)
        producer = InflightLoadProducer.for_consumer(params, ctx)
        params.finish()
        return cls(name, producer, threshold=threshold)

    def score(
        self, cycle: CycleState, request: LLMRequest, endpoints: list[EndpointView]
    ) -> Sequence[float]:
        tokens = self.producer.tokens
        t = self.threshold
        return [1.0 - min(1.0, tokens.get(e.key, 0) / t) for e in endpoints]
