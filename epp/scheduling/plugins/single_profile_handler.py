"""single-profile-handler: run the one profile; its result is primary."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Self

from epp.config import Params
from epp.scheduling.registry import BuildContext, register
from epp.scheduling.scheduler import no_endpoint_error
from epp.scheduling.types import (
    CycleState,
    LLMRequest,
    ProfileHandler,
    ProfileRunResult,
    SchedulerProfileLike,
    SchedulingResult,
)


@register
class SingleProfileHandler(ProfileHandler):
    type_name = "single-profile-handler"

    def __init__(self, name: str) -> None:
        self.name = name
        self.profile = ""

    @classmethod
    def from_params(cls, name: str, params: Params, ctx: BuildContext) -> Self:
        params.finish()
        return cls(name)

    def validate_profiles(self, profiles: Sequence[str], ctx: BuildContext) -> None:
        if len(profiles) != 1:
            raise ctx.error(
                "schedulingProfiles",
                f"{self.type_name} needs exactly one profile, got {len(profiles)}",
            )
        self.profile = profiles[0]

    def pick(
        self,
        cycle: CycleState,
        request: LLMRequest,
        profiles: Mapping[str, SchedulerProfileLike],
        results: Mapping[str, ProfileRunResult | None],
    ) -> list[str]:
        return [] if results else [self.profile]

    def process_results(
        self, cycle: CycleState, request: LLMRequest, results: dict[str, ProfileRunResult | None]
    ) -> SchedulingResult:
        if results.get(self.profile) is None:
            raise no_endpoint_error(cycle, self.profile)
        return SchedulingResult(results, self.profile)
