"""session-affinity-scorer: keep a session on the endpoint that served it before.

The response carries ``x-session-token: base64(ip:port)`` of the endpoint that
served it; a request presenting that token scores 1 on that endpoint, 0 on every
other. Stateless: nothing is stored in the EPP. Malformed tokens are ignored.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Self

from epp.config import Params
from epp.datastore import EndpointView
from epp.scheduling.registry import BuildContext, register
from epp.scheduling.types import CycleState, LLMRequest, ResponseHeaders, SchedulingResult, Scorer
from pdroute.protocol.headers import SESSION_TOKEN

_MAX_TOKEN = 512


@lru_cache(maxsize=1024)  # one entry per endpoint served (bounded: pool members, mostly)
def encode_token(endpoint: str) -> str:
    return base64.b64encode(endpoint.encode()).decode("ascii")


def decode_token(token: str) -> str | None:
    if not token or len(token) > _MAX_TOKEN:
        return None
    try:
        return base64.b64decode(token, validate=True).decode("utf-8")
    except (binascii.Error, ValueError):
        return None


@register
class SessionAffinityScorer(Scorer, ResponseHeaders):
    type_name = "session-affinity-scorer"
    unit_scores = True

    def __init__(self, name: str) -> None:
        self.name = name

    @classmethod
    def from_params(cls, name: str, params: Params, ctx: BuildContext) -> Self:
        params.get_str("mode", "encoded_endpoint_header", choices=("encoded_endpoint_header",))
        params.finish()
        return cls(name)

    def score(
        self, cycle: CycleState, request: LLMRequest, endpoints: list[EndpointView]
    ) -> Sequence[float]:
        token = request.headers.get(SESSION_TOKEN)
        target = decode_token(token) if token else None
        if target is None:
            return [0.0] * len(endpoints)
        return [1.0 if e.key == target else 0.0 for e in endpoints]

    def response_headers(
        self, cycle: CycleState, request: LLMRequest, result: SchedulingResult, served: str | None
    ) -> Mapping[str, str]:
        return {SESSION_TOKEN: encode_token(served or result.primary.targets[0].key)}

    def routing_response_headers(
        self, cycle: CycleState, request: LLMRequest, result: SchedulingResult
    ) -> Mapping[str, str]:
        # The token is known at routing time (the primary); the response phase, when
        # the gateway sends it, corrects it to the endpoint that actually served.
        return {SESSION_TOKEN: encode_token(result.primary.targets[0].key)}
