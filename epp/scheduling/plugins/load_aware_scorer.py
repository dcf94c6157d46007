"""load-aware-scorer (llm-d): 0.5 for an empty queue, falling linearly to 0 at ``threshold``.

``score = 0.5 * (1 - min(q, threshold) / threshold)``; the maximum is deliberately
0.5 so an idle endpoint does not dominate affinity scorers. Stale endpoints score 0.

The scores depend only on the candidate views (immutable, shared by every request
until the datastore's snapshot changes) and ``threshold``: the last candidate list
and its scores are kept (the last two lists, see ``ListMemo``); an equal list gets
the same tuple.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Self

from epp.config import Params
from epp.datastore import EndpointView
from epp.scheduling.plugins._util import ListMemo
from epp.scheduling.registry import BuildContext, register
from epp.scheduling.types import CycleState, LLMRequest, Scorer


@register
class LoadAwareScorer(Scorer):
    type_name = "load-aware-scorer"
    unit_scores = True

    def __init__(self, name: str, threshold: int = 128) -> None:
        self.name = name
        self.threshold = threshold
        self._memo: ListMemo[tuple[int, tuple[float, ...]]] = ListMemo()

    @classmethod
    def from_params(cls, name: str, params: Params, ctx: BuildContext) -> Self:
        threshold = params.get_int("threshold", 128, min_value=1)
        params.finish()
        return cls(name, threshold)

    def score(
        self, cycle: CycleState, request: LLMRequest, endpoints: list[EndpointView]
    ) -> Sequence[float]:
        t = self.threshold
        got = self._memo.get(endpoints)
        if got is not None and got[0] == t:
            return got[1]
        out = tuple(
            0.0
            if e.stale or (q := e.metrics.waiting) >= t
            else 0.5 * (1.0 - (q if q > 0 else 0) / t)
            for e in endpoints
        )
        self._memo.put(endpoints, (t, out))
        return out
