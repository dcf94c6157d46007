"""prefix-cache-scorer: ``matched blocks / total blocks`` from a prefix-match producer.

The producer is ``prefixMatchInfoProducerName`` when given, otherwise the one
prefix producer configured, otherwise an ``approx-prefix-cache-producer`` with
default parameters created implicitly. Prompts shorter than one block score 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import repeat
from typing import Self

from epp.config import Params
from epp.datastore import EndpointView
from epp.scheduling.plugins._util import CandidateKeys
from epp.scheduling.registry import BuildContext, register
from epp.scheduling.types import CycleState, LLMRequest, PrefixMatchProducer, Scorer


@register
class PrefixCacheScorer(Scorer):
    type_name = "prefix-cache-scorer"

    def __init__(self, name: str, producer: PrefixMatchProducer) -> None:
        self.name = name
        self.producer = producer
        self._keys = CandidateKeys()

    @classmethod
    def from_params(cls, name: str, params: Params, ctx: BuildContext) -> Self:
        key = params.key_path("prefixMatchInfoProducerName")
        producer_name = params.get_str("prefixMatchInfoProducerName", "") or None
        params.finish()
        return cls(name, ctx.prefix_producer(producer_name, key=key))

    def score(
        self, cycle: CycleState, request: LLMRequest, endpoints: list[EndpointView]
    ) -> Sequence[float]:
        info = self.producer.match_info(cycle)
        if info is None or info.total_blocks == 0 or not info.matches:
            return [0.0] * len(endpoints)
        total = info.total_blocks
        get = info.matches.get
        if len(endpoints) < 2:
            return [get(e.key, 0) / total for e in endpoints]
        keys = self._keys
        keys.of(endpoints)
        return [c / total for c in map(get, keys.keys, repeat(0))]
