"""disagg-profile-handler: decode first, then prefill when the decider says so.

1. Run the ``decode`` profile. If it finds nothing, scheduling fails (503).
2. Ask the prefill decider about the chosen decode endpoint; when it approves,
   run the ``prefill`` profile.
3. Decode is always primary. If prefill found nothing, or picked the decode
   endpoint itself, the request runs decode-only (it still succeeds).
4. PreRequest sets ``x-prefiller-host-port: <ip:port>`` when a prefill endpoint
   was chosen (client-sent values were stripped by the handler; this overrides).

Every decision is counted in ``llm_d_epp_disagg_decision{decision,reason}``.
Without a configured decider, prefill runs for every request (always-disagg).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Self

from epp.config import Params
from epp.metrics import DISAGG_DECISIONS
from epp.scheduling.registry import BuildContext, register
from epp.scheduling.scheduler import no_endpoint_error
from epp.scheduling.types import (
    CycleState,
    Decider,
    LLMRequest,
    PreRequest,
    ProfileHandler,
    ProfileRunResult,
    SchedulerProfileLike,
    SchedulingResult,
)
from pdroute.protocol.headers import PREFILLER_HOST_PORT

_VERDICT = "disagg.verdict"


@register
class DisaggProfileHandler(ProfileHandler, PreRequest):
    type_name = "disagg-profile-handler"

    def __init__(
        self,
        name: str,
        *,
        decode: str = "decode",
        prefill: str = "prefill",
        decider: Decider | None = None,
    ) -> None:
        self.name = name
        self.decode = decode
        self.prefill = prefill
        self.decider = decider
        self.has_prefill = True
        #: Bound metric children per (decision, reason): no label lookup per request.
        self._counters: dict[tuple[str, str], Callable[[], None]] = {}

    @classmethod
    def from_params(cls, name: str, params: Params, ctx: BuildContext) -> Self:
        decode, prefill = "decode", "prefill"
        profiles = params.get_params("profiles")
        if profiles is not None:
            decode = profiles.get_str("decode", decode)
            prefill = profiles.get_str("prefill", prefill)
            if profiles.has("encode"):
                raise profiles.error("encode", "encode disaggregation (E/P/D) is not supported")
            profiles.finish()
        decider: Decider | None = None
        deciders = params.get_params("deciders")
        if deciders is not None:
            ref = deciders.get_str("prefill", "")
            if deciders.has("encode"):
                raise deciders.error("encode", "encode disaggregation (E/P/D) is not supported")
            deciders.finish()
            if ref:
                decider = ctx.plugin(ref, Decider, key=deciders.key_path("prefill"))  # type: ignore[type-abstract]
        params.get_str("stageOrder", "decode-first", choices=("decode-first",))
        params.finish()
        return cls(name, decode=decode, prefill=prefill, decider=decider)

    def validate_profiles(self, profiles: Sequence[str], ctx: BuildContext) -> None:
        if self.decode not in profiles:
            raise ctx.error(
                "schedulingProfiles",
                f"{self.type_name} {self.name!r} needs a profile named {self.decode!r}",
            )
        unknown = [p for p in profiles if p not in (self.decode, self.prefill)]
        if unknown:
            raise ctx.error(
                "schedulingProfiles",
                f"{self.type_name} {self.name!r} runs only {self.decode!r} and {self.prefill!r}; "
                f"unused profile(s): {', '.join(unknown)}",
            )
        self.has_prefill = self.prefill in profiles

    def decide(
        self, cycle: CycleState, request: LLMRequest, decode: ProfileRunResult
    ) -> tuple[bool, str]:
        if self.decider is None:
            return True, "always"
        return self.decider.disaggregate(cycle, request, decode.targets[0])

    def pick(
        self,
        cycle: CycleState,
        request: LLMRequest,
        profiles: Mapping[str, SchedulerProfileLike],
        results: Mapping[str, ProfileRunResult | None],
    ) -> list[str]:
        if self.decode not in results:
            return [self.decode]
        decode = results[self.decode]
        if decode is None or not self.has_prefill or self.prefill in results:
            return []
        verdict = self.decide(cycle, request, decode)
        cycle.values[_VERDICT] = verdict
        return [self.prefill] if verdict[0] else []

    def process_results(
        self, cycle: CycleState, request: LLMRequest, results: dict[str, ProfileRunResult | None]
    ) -> SchedulingResult:
        decode = results.get(self.decode)
        if decode is None:
            raise no_endpoint_error(cycle, self.decode)
        if not self.has_prefill:
            decision, reason = "decode-only", "no-prefill-profile"
        else:
            wanted, reason = cycle.values.get(_VERDICT, (False, "unknown"))
            decision = "prefill-decode" if wanted else "decode-only"
            if wanted:
                prefill = results.get(self.prefill)
                if prefill is None:
                    decision, reason = "decode-only", "no-prefill-endpoint"
                    results.pop(self.prefill, None)
                elif prefill.targets[0].key == decode.targets[0].key:
                    decision, reason = "decode-only", "same-endpoint"
                    results.pop(self.prefill, None)
        self._count(decision, reason)
        return SchedulingResult(results, self.decode)

    def _count(self, decision: str, reason: str) -> None:
        inc = self._counters.get((decision, reason))
        if inc is None:
            # Reasons are a small fixed set (see module doc), so this stays bounded.
            inc = self._counters[(decision, reason)] = DISAGG_DECISIONS.labels(decision, reason).inc
        inc()

    def pre_request(
        self,
        cycle: CycleState,
        request: LLMRequest,
        result: SchedulingResult,
        headers: dict[str, str],
    ) -> None:
        prefill = result.profile_results.get(self.prefill)
        if prefill is not None and prefill.targets and result.primary_profile != self.prefill:
            headers[PREFILLER_HOST_PORT] = prefill.targets[0].key
        else:
            headers.pop(PREFILLER_HOST_PORT, None)
