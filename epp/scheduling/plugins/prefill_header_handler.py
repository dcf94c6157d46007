"""prefill-header-handler (legacy llm-d): set ``x-prefiller-host-port`` from the prefill profile."""

from __future__ import annotations

from typing import Self

from epp.config import Params, PluginKind
from epp.scheduling.registry import BuildContext, register
from epp.scheduling.types import CycleState, LLMRequest, Plugin, PreRequest, SchedulingResult
from pdroute.protocol.headers import PREFILLER_HOST_PORT


@register
class PrefillHeaderHandler(Plugin, PreRequest):
    type_name = "prefill-header-handler"
    kind = PluginKind.REQUEST_CONTROL

    def __init__(self, name: str, prefill_profile: str = "prefill") -> None:
        self.name = name
        self.prefill_profile = prefill_profile

    @classmethod
    def from_params(cls, name: str, params: Params, ctx: BuildContext) -> Self:
        profile = params.get_str("prefillProfile", "prefill")
        params.finish()
        return cls(name, profile)

    def pre_request(
        self,
        cycle: CycleState,
        request: LLMRequest,
        result: SchedulingResult,
        headers: dict[str, str],
    ) -> None:
        targets = result.targets(self.prefill_profile)
        if targets and result.primary_profile != self.prefill_profile:
            headers[PREFILLER_HOST_PORT] = targets[0].key
