"""no-hit-lru-scorer: spread *cold* requests (no prefix-cache hit anywhere) over the
endpoints in least-recently-used order, so that new prefixes, and the KV they grow,
land evenly across the pool instead of on whichever endpoint looks idlest right now.

llm-d's plugin of the same name and parameters. Per request:

- *hit* (some endpoint matches at least one prefix block): every endpoint scores 0.5
  (neutral: the prefix and load scorers decide);
- *cold* (no match, or no prefix information): with ``n`` candidates, endpoints that
  never received a cold request come first, in candidate order, then the others from
  least to most recently used; rank ``r`` (0 = first) scores ``1 - r / (n - 1)``
  (a single candidate scores 1.0).

After scheduling (PreRequest) a cold request moves its primary endpoint, then its
prefill endpoint (profile ``prefillProfile``), to the most-recently-used end.

Invariant: ``_lru`` holds at most ``lru_size`` endpoint keys, least recently used
first; endpoints that leave the pool are dropped from it.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import repeat
from operator import attrgetter
from typing import Self

from epp.config import Params
from epp.datastore import EndpointView
from epp.scheduling.plugins._util import CandidateKeys
from epp.scheduling.plugins.prefix_cache_scorer import PrefixCacheScorer
from epp.scheduling.registry import BuildContext, register
from epp.scheduling.types import (
    CycleState,
    LLMRequest,
    Plugin,
    PrefixMatchProducer,
    PreRequest,
    SchedulingResult,
    Scorer,
)

DEFAULT_PREFIX_PLUGIN = "prefix-cache-scorer"
_KEY = attrgetter("key")


@register
class NoHitLRUScorer(Scorer, PreRequest):
    type_name = "no-hit-lru-scorer"
    unit_scores = True

    def __init__(
        self,
        name: str,
        producer: PrefixMatchProducer | None = None,
        *,
        prefill_profile: str = "prefill",
        lru_size: int = 1024,
    ) -> None:
        self.name = name
        #: Whose match decides hit/cold; None: the cycle's first prefix match.
        self.producer = producer
        self.prefill_profile = prefill_profile
        self.lru_size = lru_size
        #: Insertion-ordered (a plain dict iterates faster than an OrderedDict).
        self._lru: dict[str, None] = {}
        self._cold_key = f"{name}.cold"
        self._table_key = (0, 0)
        self._keys = CandidateKeys()
        self._table_values: list[float] = []

    @classmethod
    def from_params(cls, name: str, params: Params, ctx: BuildContext) -> Self:
        key = params.key_path("prefixPluginName")
        prefix_name = params.get_str("prefixPluginName", "") or DEFAULT_PREFIX_PLUGIN
        params.get_str("prefixPluginType", "")  # accepted (some llm-d docs list it)
        prefill = params.get_str("prefillProfile", "prefill") or "prefill"
        size = params.get_int("lruSize", 1024, min_value=1, max_value=1 << 20)
        params.finish()
        producer: PrefixMatchProducer | None = None
        if ctx.spec(prefix_name) is not None:
            plugin = ctx.plugin(prefix_name, Plugin, key=key)  # type: ignore[type-abstract]
            if isinstance(plugin, PrefixCacheScorer):
                producer = plugin.producer
            elif isinstance(plugin, PrefixMatchProducer):
                producer = plugin
            else:
                raise ctx.error(key, f"plugin {prefix_name!r} is not a prefix-cache plugin")
        scorer = cls(name, producer, prefill_profile=prefill, lru_size=size)
        ctx.on_endpoint_removed(scorer.remove_endpoint)
        return scorer

    def is_cold(self, cycle: CycleState) -> bool:
        info = self.producer.match_info(cycle) if self.producer is not None else cycle.prefix_match
        if info is None or not info.matches:
            return True
        return not any(v > 0 for v in info.matches.values())

    def score(
        self, cycle: CycleState, request: LLMRequest, endpoints: list[EndpointView]
    ) -> Sequence[float]:
        cold = self.is_cold(cycle)
        cycle.values[self._cold_key] = cold
        n = len(endpoints)
        if not cold:
            return [0.5] * n
        if n == 1:
            return [1.0]
        lru = self._lru
        # table[r]: the score of rank r, max(0, 1 - r / (n - 1)), for every rank
        # this LRU can produce (computed once per size, then looked up).
        table = self._table(n, len(lru))
        if not lru:  # nobody used yet: rank = candidate order
            return table[:n]
        position = {k: i for i, k in enumerate(lru)}  # 0 = least recently used
        try:  # the usual case, all used before: rank = LRU position
            return list(map(table.__getitem__, self._keys.of(endpoints)(position)))
        except KeyError:
            pass
        pos = list(map(position.get, map(_KEY, endpoints), repeat(-1)))
        never = pos.count(-1)  # these rank first, in candidate order
        out: list[float] = []
        append = out.append
        r_never = 0
        for p in pos:
            if p < 0:
                append(table[r_never])
                r_never += 1
            else:
                append(table[never + p])
        return out

    def _table(self, n: int, size: int) -> list[float]:
        """Scores by rank for ``n`` candidates and an LRU of ``size`` keys."""
        key = (n, size)
        if self._table_key != key:
            span = n - 1
            self._table_values = [max(0.0, 1.0 - r / span) for r in range(n + size)]
            self._table_key = key
        return self._table_values

    def pre_request(
        self,
        cycle: CycleState,
        request: LLMRequest,
        result: SchedulingResult,
        headers: dict[str, str],
    ) -> None:
        if not cycle.values.pop(self._cold_key, False):
            return
        self._touch(result.primary.targets)
        prefill = result.profile_results.get(self.prefill_profile)
        if prefill is not None and self.prefill_profile != result.primary_profile:
            self._touch(prefill.targets)

    def _touch(self, targets: Sequence[EndpointView]) -> None:
        if not targets:
            return
        key = targets[0].key
        lru = self._lru
        lru.pop(key, None)
        lru[key] = None
        while len(lru) > self.lru_size:
            del lru[next(iter(lru))]

    def remove_endpoint(self, endpoint: str) -> None:
        self._lru.pop(endpoint, None)

    def recently_used(self) -> list[str]:
        """Endpoint keys, least recently used (for a cold request) first."""
        return list(self._lru)
