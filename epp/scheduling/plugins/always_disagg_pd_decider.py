"""always-disagg-pd-decider: every request gets a prefill endpoint."""

from __future__ import annotations

from typing import Self

from epp.config import Params
from epp.datastore import EndpointView
from epp.scheduling.registry import BuildContext, register
from epp.scheduling.types import CycleState, Decider, LLMRequest


@register
class AlwaysDisaggPDDecider(Decider):
    type_name = "always-disagg-pd-decider"

    def __init__(self, name: str) -> None:
        self.name = name

    @classmethod
    def from_params(cls, name: str, params: Params, ctx: BuildContext) -> Self:
        params.finish()
        return cls(name)

    def disaggregate(
        self, cycle: CycleState, request: LLMRequest, decode: EndpointView
    ) -> tuple[bool, str]:
        return True, "always"
