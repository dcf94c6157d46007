"""max-score-picker: the highest total score wins; ties are broken at random.

With ``maxNumOfEndpoints > 1`` the next best follow as fallbacks (best first).
Candidates are sorted by score (stable) and only groups of equal scores that
reach into the chosen ones are put in random order, which draws from the rng
only when there is a tie to break. Scores are expected to be numbers (the
runner's totals never hold NaN).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable

from epp.datastore import EndpointView
from epp.scheduling.plugins._util import CountPicker
from epp.scheduling.registry import register
from epp.scheduling.types import CycleState, LLMRequest, ProfileRunResult


@register
class MaxScorePicker(CountPicker):
    type_name = "max-score-picker"

    def pick(
        self,
        cycle: CycleState,
        request: LLMRequest,
        endpoints: list[EndpointView],
        scores: list[float],
    ) -> ProfileRunResult:
        n = len(endpoints)
        if n == 0:
            return ProfileRunResult([])
        rng = self.rng
        if self.max_endpoints == 1:
            best = max(scores)
            if not math.isnan(best) and scores.count(best) == 1:  # one best
                i = scores.index(best)
            else:
                ties = [i for i in range(n) if scores[i] == best]
                i = ties[0] if len(ties) == 1 else rng.choice(ties)
            return ProfileRunResult([endpoints[i]], [scores[i]])
        k = self.max_endpoints
        at = scores.__getitem__
        order = sorted(range(n), key=at, reverse=True)  # stable: ties in candidate order
        # Ties only matter among the chosen and between the last chosen and the next;
        # the values are sorted, so "no tie" is "all distinct".
        vals = list(map(at, order[: k + 1]))
        if len(set(vals)) == len(vals):
            top = order[:k]
            return ProfileRunResult(list(map(endpoints.__getitem__, top)), vals[:k])
        top = _random_ties(order, at, k, rng)
        return ProfileRunResult([endpoints[i] for i in top], [at(i) for i in top])


def _random_ties(
    order: list[int], at: Callable[[int], float], k: int, rng: random.Random
) -> list[int]:
    """The first ``k`` of ``order`` (sorted by score, best first) with each group
    of equal scores in uniformly random order: the same distribution as shuffling
    all candidates before a stable sort, drawing only for the groups that count."""
    out: list[int] = []
    j = 0
    n = len(order)
    while len(out) < k and j < n:
        s = at(order[j])
        end = j + 1
        while end < n and at(order[end]) == s:
            end += 1
        group = order[j:end]
        need = k - len(out)
        if len(group) > need:
            group = rng.sample(group, need)
        elif len(group) > 1:
            rng.shuffle(group)
        out += group
        j = end
    return out
