"""always-disagg-pd-decider: every request gets a prefill endpoint."""

from __future__ import annotations

from epp.datastore import EndpointView
from epp.scheduling.plugins._util import NoParams
from epp.scheduling.registry import register
from epp.scheduling.types import CycleState, Decider, LLMRequest


@register
class AlwaysDisaggPDDecider(NoParams, Decider):
    type_name = "always-disagg-pd-decider"

    def disaggregate(
        self, cycle: CycleState, request: LLMRequest, decode: EndpointView
    ) -> tuple[bool, str]:
        return True, "always"
