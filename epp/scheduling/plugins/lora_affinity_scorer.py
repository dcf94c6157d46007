"""lora-affinity-scorer: prefer endpoints where the requested adapter is already loaded.

1.0 adapter active; 0.8 room for another adapter (active + waiting < max_loras);
0.6 adapter waiting to load; 0 otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence

from epp.datastore import EndpointView
from epp.scheduling.plugins._util import NoParams
from epp.scheduling.registry import register
from epp.scheduling.types import CycleState, LLMRequest, Scorer


@register
class LoraAffinityScorer(NoParams, Scorer):
    type_name = "lora-affinity-scorer"

    def score(
        self, cycle: CycleState, request: LLMRequest, endpoints: list[EndpointView]
    ) -> Sequence[float]:
        model = request.model
        out = []
        for e in endpoints:
            m = e.metrics
            if model in m.active_loras:
                out.append(1.0)
            elif len(m.active_loras) + len(m.waiting_loras) < m.max_loras:
                out.append(0.8)
            elif model in m.waiting_loras:
                out.append(0.6)
            else:
                out.append(0.0)
        return out
