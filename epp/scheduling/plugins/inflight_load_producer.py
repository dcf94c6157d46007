"""inflight-load-producer: the EPP's own count of requests (and prompt tokens) in flight.

A request counts against its primary endpoint from PreRequest until its response
completes. Entries older than ``requestTimeout`` are dropped (a response that never
reports completion cannot leak load), and endpoints leaving the pool are purged,
so memory is bounded by the number of requests in flight.
Read by ``active-request-scorer`` and ``token-load-scorer``.
"""

from __future__ import annotations

import itertools
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Self

from epp.config import Params
from epp.datastore import EndpointView
from epp.scheduling.registry import BuildContext, register
from epp.scheduling.types import (
    CycleState,
    LLMRequest,
    PreRequest,
    Producer,
    ResponseComplete,
    SchedulingResult,
)


def parse_duration(params: Params, key: str, default_s: float) -> float:
    """A Go-style duration (``"2m"``, ``"500ms"``, ``"30s"``) or a number of seconds."""
    raw = params.get_any(key)
    if raw is None:
        return default_s
    if isinstance(raw, int | float) and not isinstance(raw, bool):
        value = float(raw)
    elif isinstance(raw, str):
        units = (("ms", 0.001), ("s", 1.0), ("m", 60.0), ("h", 3600.0))
        text = raw.strip()
        for suffix, mult in units:
            num = text[: -len(suffix)]
            if text.endswith(suffix) and num.replace(".", "", 1).isdigit():
                value = float(num) * mult
                break
        else:
            raise params.error(key, f"expected a duration like 30s or 2m, got {raw!r}")
    else:
        raise params.error(key, f"expected a duration like 30s or 2m, got {raw!r}")
    if value <= 0:
        raise params.error(key, f"must be > 0, got {raw!r}")
    return value


@register
class InflightLoadProducer(Producer, PreRequest, ResponseComplete):
    type_name = "inflight-load-producer"
    needs_response_phase = True  # in-flight counts end when the response does

    def __init__(
        self, name: str, *, timeout_s: float = 300.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.name = name
        self.timeout_s = timeout_s
        self.clock = clock
        self.requests: dict[str, int] = {}
        self.tokens: dict[str, int] = {}
        self._entries: OrderedDict[int, tuple[str, int, float]] = OrderedDict()
        self._ids = itertools.count(1)
        self._key = f"{name}.entry"

    @classmethod
    def from_params(cls, name: str, params: Params, ctx: BuildContext) -> Self:
        timeout = parse_duration(params, "requestTimeout", 300.0)
        params.finish()
        plugin = cls(name, timeout_s=timeout, clock=ctx.clock or time.monotonic)
        ctx.on_endpoint_removed(plugin.remove_endpoint)
        return plugin

    @classmethod
    def for_consumer(cls, params: Params, ctx: BuildContext) -> InflightLoadProducer:
        """The producer a consumer scorer reads: its ``inflightLoadProducerName``
        parameter, else the one configured, else an implicit one (shared)."""
        key = params.key_path("inflightLoadProducerName")
        name = params.get_str("inflightLoadProducerName", "") or None
        return ctx.producer(
            InflightLoadProducer,
            name,
            key=key,
            default_type=cls.type_name,
            param="inflightLoadProducerName",
        )

    def __len__(self) -> int:
        return len(self._entries)

    def produce(
        self, cycle: CycleState, request: LLMRequest, endpoints: list[EndpointView]
    ) -> None:
        deadline = self.clock() - self.timeout_s
        entries = self._entries
        while entries:
            seq, (_, _, started) = next(iter(entries.items()))
            if started > deadline:
                break
            self._release(seq)

    def pre_request(
        self,
        cycle: CycleState,
        request: LLMRequest,
        result: SchedulingResult,
        headers: dict[str, str],
    ) -> None:
        endpoint = result.primary.targets[0].key
        tokens = request.estimated_prompt_tokens
        seq = next(self._ids)
        self._entries[seq] = (endpoint, tokens, self.clock())
        self.requests[endpoint] = self.requests.get(endpoint, 0) + 1
        self.tokens[endpoint] = self.tokens.get(endpoint, 0) + tokens
        cycle.values[self._key] = seq

    def response_complete(
        self,
        cycle: CycleState,
        request: LLMRequest,
        result: SchedulingResult,
        served: str | None,
        status: int | None,
    ) -> None:
        seq = cycle.values.pop(self._key, None)
        if isinstance(seq, int):
            self._release(seq)

    def remove_endpoint(self, endpoint: str) -> None:
        self.requests.pop(endpoint, None)
        self.tokens.pop(endpoint, None)
        for seq in [s for s, (ep, _, _) in self._entries.items() if ep == endpoint]:
            del self._entries[seq]

    def _release(self, seq: int) -> None:
        entry = self._entries.pop(seq, None)
        if entry is None:
            return
        endpoint, tokens, _ = entry
        n = self.requests.get(endpoint, 0) - 1
        t = self.tokens.get(endpoint, 0) - tokens
        if n > 0:
            self.requests[endpoint] = n
            self.tokens[endpoint] = max(t, 0)
        else:
            self.requests.pop(endpoint, None)
            self.tokens.pop(endpoint, None)
