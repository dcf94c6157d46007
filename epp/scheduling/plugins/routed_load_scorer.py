"""routed-load-scorer (pdroute): prefer endpoints that this EPP sent less traffic to
*recently*, counted with exponential decay.

Each endpoint keeps a count of the requests routed to it (PreRequest, primary pick)
that halves every ``halfLife``; the score is min-max normalized:
``(max_c - c) / (max_c - min_c)``, 1.0 for every endpoint when all counts are equal.

Why not the in-flight count (``active-request-scorer``) or the scraped queue? Those
are instantaneous: a hot prefix group's endpoint can momentarily have fewer requests
in flight than the others (its traffic is bursty), and a new prefix placed there in
that moment stays there for good (prefix affinity). The decayed count is the
endpoint's recent *request rate* (about ``rate * halfLife / ln 2``), a steadier
signal for where new prefixes should go; it still reacts within a few seconds
because every pick counts at once, before the engine reports anything.

Invariant: ``_counts`` holds one ``(count, as_of)`` per endpoint routed to and still
in the pool; the count is exact at ``as_of`` and decays from there; no I/O, clock
injected.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from itertools import repeat
from typing import Self

from epp.config import Params
from epp.datastore import EndpointView
from epp.scheduling.plugins._util import CandidateKeys
from epp.scheduling.plugins.inflight_load_producer import parse_duration
from epp.scheduling.registry import BuildContext, register
from epp.scheduling.types import CycleState, LLMRequest, PreRequest, SchedulingResult, Scorer

#: ``(count, as_of)`` of an endpoint never routed to.
_NEVER = (0.0, math.inf)


@register
class RoutedLoadScorer(Scorer, PreRequest):
    type_name = "routed-load-scorer"
    unit_scores = True

    def __init__(
        self,
        name: str,
        *,
        half_life_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.half_life_s = half_life_s
        self.clock = clock
        self._rate = math.log(2) / half_life_s
        self._counts: dict[str, tuple[float, float]] = {}
        self._keys = CandidateKeys()

    @classmethod
    def from_params(cls, name: str, params: Params, ctx: BuildContext) -> Self:
        half_life = parse_duration(params, "halfLife", 30.0)
        params.finish()
        scorer = cls(name, half_life_s=half_life, clock=ctx.clock or time.monotonic)
        ctx.on_endpoint_removed(scorer.remove_endpoint)
        return scorer

    def load(self, endpoint: str, now: float | None = None) -> float:
        """The decayed count of requests routed to ``endpoint``."""
        entry = self._counts.get(endpoint)
        if entry is None:
            return 0.0
        count, as_of = entry
        t = self.clock() if now is None else now
        return count * math.exp(-self._rate * max(0.0, t - as_of))

    def score(
        self, cycle: CycleState, request: LLMRequest, endpoints: list[EndpointView]
    ) -> Sequence[float]:
        if not endpoints:
            return []
        now = self.clock()
        get = self._counts.get
        exp = math.exp
        neg_rate = -self._rate
        # self.load(key, now) per endpoint, inlined (same floats); an endpoint never
        # routed to gets _NEVER: its age is -inf, so its load is the count, 0.0.
        entries: Sequence[tuple[float, float]]
        if len(endpoints) < 2:
            entries = [get(e.key, _NEVER) for e in endpoints]
        else:
            keys = self._keys
            getter = keys.of(endpoints)
            found: Sequence[tuple[float, float]] | None = None
            if len(self._counts) >= len(endpoints):  # else some were never routed to
                try:  # every candidate routed to before (the usual case): one C call
                    found = getter(self._counts)
                except KeyError:
                    found = None
            entries = list(map(get, keys.keys, repeat(_NEVER))) if found is None else found
        loads = [
            count * exp(neg_rate * age) if (age := now - as_of) > 0.0 else count
            for count, as_of in entries
        ]
        lo, hi = min(loads), max(loads)
        if hi - lo <= 1e-9:
            return [1.0] * len(loads)
        span = hi - lo
        return [(hi - c) / span for c in loads]

    def pre_request(
        self,
        cycle: CycleState,
        request: LLMRequest,
        result: SchedulingResult,
        headers: dict[str, str],
    ) -> None:
        targets = result.primary.targets
        if not targets:
            return
        key = targets[0].key
        now = self.clock()
        self._counts[key] = (self.load(key, now) + 1.0, now)

    def remove_endpoint(self, endpoint: str) -> None:
        self._counts.pop(endpoint, None)
