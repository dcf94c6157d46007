"""pd-profile-handler (legacy llm-d 0.3): disaggregate when the uncached suffix is long.

Parameters ``threshold`` (characters, 0 = always disaggregate), ``decodeProfile``,
``prefillProfile``, ``hashBlockSize`` and ``prefixPluginName`` (accepted). The
uncached part is ``len(prompt) - matched_blocks x block_chars`` on the chosen
decode endpoint. Behaves otherwise like ``disagg-profile-handler`` (it also sets
``x-prefiller-host-port``, so ``prefill-header-handler`` is optional).
"""

from __future__ import annotations

from typing import Self

from epp.config import Params
from epp.scheduling.plugins.disagg_profile_handler import DisaggProfileHandler
from epp.scheduling.registry import BuildContext, register
from epp.scheduling.types import CycleState, LLMRequest, ProfileRunResult


@register
class PDProfileHandler(DisaggProfileHandler):
    type_name = "pd-profile-handler"

    threshold = 0

    @classmethod
    def from_params(cls, name: str, params: Params, ctx: BuildContext) -> Self:
        threshold = params.get_int("threshold", 0, min_value=0)
        params.get_int("hashBlockSize", 64, min_value=1)
        params.get_str("prefixPluginName", "")
        decode = params.get_str("decodeProfile", "decode")
        prefill = params.get_str("prefillProfile", "prefill")
        params.finish()
        handler = cls(name, decode=decode, prefill=prefill)
        handler.threshold = threshold
        return handler

    def decide(
        self, cycle: CycleState, request: LLMRequest, decode: ProfileRunResult
    ) -> tuple[bool, str]:
        if self.threshold == 0:
            return True, "always"
        info = cycle.prefix_match
        n = len(request.prompt)
        cached_chars = 0 if info is None else info.cached_chars(decode.targets[0].key, n)
        uncached = n - cached_chars
        if uncached >= self.threshold:
            return True, "uncached-prefix"
        return False, "cached" if cached_chars else "short-prompt"
