"""approx-prefix-cache-producer: prefix match info from the EPP's own routing history.

Before scheduling it hashes the prompt (see :mod:`epp.index.approx_prefix`) and
matches it against the index; after scheduling it *assumes* the chosen endpoints
(the primary and, with P/D, the prefill endpoint) now cache the prompt's blocks.
When the proxy reports a different served endpoint (a fallback), that endpoint
learns the blocks too. Endpoints leaving the pool are purged from the index, and
only current pool members learn: an endpoint removed while its request was being
scheduled, or a served address outside the pool, would otherwise hold up to
``lruCapacityPerServer`` blocks that no removal event ever purges.
"""

from __future__ import annotations

from typing import Self

from epp.config import Params
from epp.datastore import Datastore, EndpointView
from epp.index.approx_prefix import DEFAULT_LRU_CAPACITY, ApproxPrefixIndex, prefix_hashes
from epp.scheduling.plugins._util import routed_endpoints, served_elsewhere
from epp.scheduling.registry import BuildContext, register
from epp.scheduling.types import (
    CHARS_PER_TOKEN,
    CycleState,
    LLMRequest,
    PrefixMatchInfo,
    PrefixMatchProducer,
    PreRequest,
    ResponseComplete,
    SchedulingResult,
)


@register
class ApproxPrefixCacheProducer(PrefixMatchProducer, PreRequest, ResponseComplete):
    type_name = "approx-prefix-cache-producer"

    def __init__(
        self,
        name: str,
        *,
        block_size_tokens: int = 16,
        max_blocks: int = 256,
        lru_capacity: int = DEFAULT_LRU_CAPACITY,
        block_chars: int | None = None,
        datastore: Datastore | None = None,
    ) -> None:
        self.name = name
        #: Pool membership for learning; None (unit tests) learns any endpoint.
        self.datastore = datastore
        self.block_chars = block_chars or block_size_tokens * CHARS_PER_TOKEN
        # A legacy block given in characters counts as its estimated tokens.
        self.block_tokens = (
            block_size_tokens if not block_chars else -(-block_chars // CHARS_PER_TOKEN)
        )
        self.max_blocks = max_blocks
        self.index = ApproxPrefixIndex(capacity_per_endpoint=lru_capacity, metrics_label=name)

    @classmethod
    def from_params(cls, name: str, params: Params, ctx: BuildContext) -> Self:
        block_tokens = params.get_int("blockSizeTokens", 16, min_value=1, max_value=1 << 16)
        # Legacy (2025) parameter: block size in characters.
        legacy_chars = params.get_int("blockSize", 0, min_value=0, max_value=1 << 20)
        if legacy_chars and params.has("blockSizeTokens"):
            raise params.error(
                "blockSize", "give blockSizeTokens or the legacy blockSize, not both"
            )
        max_blocks = params.get_int("maxPrefixBlocksToMatch", 256, min_value=1, max_value=1 << 20)
        max_tokens = params.get_int("maxPrefixTokensToMatch", 0, min_value=0, max_value=1 << 30)
        capacity = params.get_int(
            "lruCapacityPerServer", DEFAULT_LRU_CAPACITY, min_value=1, max_value=1 << 24
        )
        # Accepted for compatibility; block size and capacity come from the parameters.
        params.get_bool("autoTune", False)
        params.finish()
        if max_tokens:
            max_blocks = max(1, max_tokens // block_tokens)
        plugin = cls(
            name,
            block_size_tokens=block_tokens,
            max_blocks=max_blocks,
            lru_capacity=capacity,
            block_chars=legacy_chars or None,
            datastore=ctx.datastore,
        )
        ctx.on_endpoint_removed(plugin.index.remove_endpoint)
        return plugin

    def produce(
        self, cycle: CycleState, request: LLMRequest, endpoints: list[EndpointView]
    ) -> None:
        hashes = prefix_hashes(
            request.prompt,
            request.model,
            block_chars=self.block_chars,
            max_blocks=self.max_blocks,
            salt=request.cache_salt,
        )
        info = PrefixMatchInfo(
            total_blocks=len(hashes),
            block_tokens=self.block_tokens,
            matches=self.index.match(hashes) if hashes else {},
            hashes=hashes,
            block_chars=self.block_chars,
        )
        self.publish(cycle, info)

    def pre_request(
        self,
        cycle: CycleState,
        request: LLMRequest,
        result: SchedulingResult,
        headers: dict[str, str],
    ) -> None:
        info = self.hashed_match_info(cycle)
        if info is None:
            return
        primary = result.primary.targets[0].key
        if info.total_blocks:
            self.index.record_hit_ratio(info.matches.get(primary, 0) / info.total_blocks)
        for endpoint in routed_endpoints(result, self.datastore):
            self.index.add(endpoint, info.hashes)

    def response_complete(
        self,
        cycle: CycleState,
        request: LLMRequest,
        result: SchedulingResult,
        served: str | None,
        status: int | None,
    ) -> None:
        endpoint = served_elsewhere(result, served, status, self.datastore)
        if endpoint is None:
            return
        info = self.hashed_match_info(cycle)
        if info is not None:
            self.index.add(endpoint, info.hashes)
