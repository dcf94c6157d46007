"""The Director: one request from parsed body to routing decision, and its finish.

Order per request (llm-d's director, without flow control):

1. parse the body (400 on bad JSON / missing ``model``) and detect the API by path;
2. candidates = ready endpoints of the datastore snapshot, narrowed to the proxy's
   subset hint when one is given (503 when none is left);
3. admission: a request with priority < 0 (header ``x-gateway-inference-priority``)
   is shed with 429 while the saturation detector reports >= 1.0;
4. async ``PrepareData`` hooks (bounded by ``prepare_timeout_s``), then the
   scheduler (503 ``NoReadyEndpoint`` when a profile's filters leave nothing: the
   usual cause is a missing role/label, which retrying soon will not fix, so we do
   not use llm-d's 429 here);
5. ``PreRequest`` hooks (prefix learning, ``x-prefiller-host-port``);
6. a :class:`Decision` whose ``finish`` releases the in-flight count and runs the
   ``ResponseComplete`` hooks exactly once.

Hook failures are logged and never fail a request. Request/latency counters
by model are recorded by the stream handler, not here; the scheduler records
its own latency and attempt metrics.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from epp.config import EndpointPickerConfig, load_config, load_config_text, load_default_config
from epp.datalayer.scraper import ScrapeOptions, scrape_options
from epp.datastore import Datastore, EndpointView
from epp.errors import EppError, Internal, NoReadyEndpoint, Shed
from epp.requestcontrol.api import Director, IncomingRequest, ResponseInfo, RoutingDecision
from epp.requestcontrol.parse import header_int, parse_body
from epp.scheduling import (
    CycleState,
    LLMRequest,
    Pipeline,
    PrepareData,
    SchedulingResult,
    build_pipeline,
)
from pdroute.protocol.headers import PREFILLER_HOST_PORT, REQUEST_ID

log = logging.getLogger(__name__)

PRIORITY_HEADER = "x-gateway-inference-priority"
_EMPTY: Mapping[str, str] = {}


class Decision:
    """A :class:`epp.requestcontrol.api.RoutingDecision` produced by the director."""

    __slots__ = (
        "_director",
        "_finished",
        "_headers",
        "cycle",
        "endpoints",
        "request",
        "result",
        "routing_metadata",
        "set_headers",
    )

    def __init__(
        self,
        director: EppDirector,
        endpoints: list[str],
        set_headers: dict[str, str],
        *,
        request: LLMRequest | None = None,
        result: SchedulingResult | None = None,
        cycle: CycleState | None = None,
    ) -> None:
        self._director = director
        self.endpoints = endpoints
        self.set_headers = set_headers
        self.request = request
        self.result = result
        self.cycle = cycle
        #: Response headers known at routing time, for the ``envoy.lb`` metadata.
        self.routing_metadata: dict[str, str] = {}
        self._finished = False
        self._headers: Mapping[str, str] | None = None

    @property
    def body(self) -> bytes | None:
        return None

    @property
    def model(self) -> str | None:
        """The request's ``model`` (None for body-less requests), for metric labels."""
        return self.request.model if self.request is not None else None

    @property
    def prefill_endpoint(self) -> str | None:
        return self.set_headers.get(PREFILLER_HOST_PORT)

    def response_headers(self, info: ResponseInfo) -> Mapping[str, str]:
        if self.result is None or self.request is None or self.cycle is None:
            return _EMPTY
        if self._headers is None:
            out: dict[str, str] = {}
            for hook in self._director.pipeline.response_headers:
                try:
                    out.update(
                        hook.response_headers(self.cycle, self.request, self.result, _served(info))
                    )
                except Exception:
                    log.exception("response-headers hook %s failed", getattr(hook, "name", hook))
            self._headers = out
        return self._headers

    def finish(self, info: ResponseInfo) -> None:
        if self._finished:
            return
        self._finished = True
        self._director.release(self.endpoints[0] if self.endpoints else None)
        if self.result is None or self.request is None or self.cycle is None:
            return
        served = _served(info)
        for hook in self._director.pipeline.response_complete:
            try:
                hook.response_complete(self.cycle, self.request, self.result, served, info.status)
            except Exception:
                log.exception("response-complete hook %s failed", getattr(hook, "name", hook))


def _served(info: ResponseInfo) -> str | None:
    """The endpoint that served the response (the first, should the proxy list several)."""
    raw = info.served_endpoint
    if not raw:
        return None
    return raw.split(",", 1)[0].strip() or None


class EppDirector:
    """Implements :class:`epp.requestcontrol.api.Director` on top of a :class:`Pipeline`."""

    def __init__(
        self,
        datastore: Datastore,
        config: EndpointPickerConfig,
        *,
        rng: random.Random | None = None,
        prepare_timeout_s: float = 0.4,
        services: Mapping[str, object] | None = None,
    ) -> None:
        self.datastore = datastore
        self.config = config
        #: The data layer's settings, validated now so that a bad metrics-data-source
        #: / extractor parameter or ``engineConfigs`` spec fails start-up (ConfigError).
        #: Wire: ``MetricsScraper(datastore, ..., **director.scrape_options.scraper_kwargs())``.
        self.scrape_options: ScrapeOptions = scrape_options(config)
        self.rng = rng or random.Random()
        self.pipeline: Pipeline = build_pipeline(
            config, datastore=datastore, rng=self.rng, services=services
        )
        self.prepare_timeout_s = prepare_timeout_s
        self._inflight: dict[str, int] = {}

    # -- Director protocol -------------------------------------------------

    @property
    def needs_response_body(self) -> bool:
        return self.pipeline.needs_response_body

    @property
    def needs_response_phase(self) -> bool:
        return self.pipeline.needs_response_phase

    def ready(self) -> bool:
        return self.datastore.synced

    def route_bodyless(self, request: IncomingRequest) -> Decision:
        candidates = self._candidates(request)
        chosen = self.rng.choice(candidates).key
        self._acquire(chosen)
        return Decision(self, [chosen], {})

    async def route(self, request: IncomingRequest) -> Decision:
        headers = request.headers
        parsed = parse_body(request.body, headers.get(":path", ""))
        priority = header_int(headers, PRIORITY_HEADER, 0)
        llm = LLMRequest(
            request_id=request.request_id or headers.get(REQUEST_ID, ""),
            model=parsed.model,
            prompt=parsed.prompt,
            api=parsed.api,
            headers=headers,
            priority=priority,
            prompt_tokens=parsed.prompt_tokens,
            cache_salt=parsed.cache_salt,
            body=parsed.body,
        )
        candidates = self._candidates(request)
        if priority < 0:
            saturation = self.pipeline.saturation_detector.saturation(candidates)
            if saturation >= 1.0:
                raise Shed(
                    f"request dropped: pool saturated ({saturation:.2f} >= 1.0) "
                    f"and priority {priority} < 0 is sheddable"
                )
        cycle = CycleState()
        if self.pipeline.prepare_data:
            await self._prepare(cycle, llm, candidates)
        try:
            result, cycle = self.pipeline.scheduler.schedule(llm, candidates, cycle)
        except EppError:
            raise
        except Exception as e:
            log.exception("scheduler failed for request %s", llm.request_id)
            raise Internal(f"scheduling failed: {type(e).__name__}") from e
        set_headers: dict[str, str] = {}
        for hook in self.pipeline.pre_request:
            try:
                hook.pre_request(cycle, llm, result, set_headers)
            except Exception:
                log.exception("pre-request hook %s failed", getattr(hook, "name", hook))
        endpoints = [t.key for t in result.primary.targets]
        self._acquire(endpoints[0])
        decision = Decision(self, endpoints, set_headers, request=llm, result=result, cycle=cycle)
        for rh in self.pipeline.response_headers:
            try:
                extra = rh.routing_response_headers(cycle, llm, result)
            except Exception:
                log.exception("routing response-headers hook %s failed", getattr(rh, "name", rh))
                continue
            if extra:
                decision.routing_metadata.update(extra)
        return decision

    # -- lifecycle -------------------------------------------------------------

    def start(self) -> None:
        """Start plugins' background work (call once the event loop runs).

        Any plugin with a ``start()`` method is started (e.g. the precise prefix
        producer's KV-event subscriptions); plugins without one need nothing.
        """
        for plugin in self.pipeline.plugins.values():
            start = getattr(plugin, "start", None)
            if callable(start):
                start()

    async def aclose(self) -> None:
        """Stop plugins' background work (``async stop()``); errors are logged."""
        for plugin in self.pipeline.plugins.values():
            stop = getattr(plugin, "stop", None)
            if stop is not None and inspect.iscoroutinefunction(stop):
                try:
                    await stop()
                except Exception:
                    log.exception("stopping plugin %s failed", plugin.name)

    # -- internals -----------------------------------------------------------

    def _candidates(self, request: IncomingRequest) -> list[EndpointView]:
        views = list(self.datastore.snapshot().endpoints)
        if not views:
            raise NoReadyEndpoint("no ready endpoint in the pool")
        hint = request.subset_hint
        if hint is not None:
            allowed = {h.strip() for h in hint}
            views = [v for v in views if v.key in allowed]
            if not views:
                raise NoReadyEndpoint("no ready endpoint in the proxy's subset hint")
        return views

    async def _prepare(
        self, cycle: CycleState, llm: LLMRequest, candidates: list[EndpointView]
    ) -> None:
        hooks = self.pipeline.prepare_data
        if len(hooks) == 1:
            await self._prepare_one(hooks[0], cycle, llm, candidates)
            return
        try:
            async with asyncio.timeout(self.prepare_timeout_s):
                results = await asyncio.gather(
                    *(h.prepare_data(cycle, llm, candidates) for h in hooks), return_exceptions=True
                )
        except TimeoutError:
            log.warning(
                "prepare-data hooks timed out after %.3fs (request %s)",
                self.prepare_timeout_s,
                llm.request_id,
            )
            return
        for hook, r in zip(hooks, results, strict=True):
            if isinstance(r, BaseException):
                log.error("prepare-data hook %s failed: %r", getattr(hook, "name", hook), r)

    async def _prepare_one(
        self, hook: PrepareData, cycle: CycleState, llm: LLMRequest, candidates: list[EndpointView]
    ) -> None:
        """One hook (the usual case): awaited in this task, no gather and no child
        task per request; same timeout, same logging, never raises but cancellation."""
        try:
            async with asyncio.timeout(self.prepare_timeout_s):
                await hook.prepare_data(cycle, llm, candidates)
        except TimeoutError:
            log.warning(
                "prepare-data hooks timed out after %.3fs (request %s)",
                self.prepare_timeout_s,
                llm.request_id,
            )
        except asyncio.CancelledError as e:
            task = asyncio.current_task()
            if task is None or task.cancelling():
                raise  # this request is being cancelled
            # The hook cancelled something of its own: a failure, as under gather.
            log.error("prepare-data hook %s failed: %r", getattr(hook, "name", hook), e)
        except Exception as e:
            log.error("prepare-data hook %s failed: %r", getattr(hook, "name", hook), e)

    def _acquire(self, endpoint: str) -> None:
        self._inflight[endpoint] = self._inflight.get(endpoint, 0) + 1

    def release(self, endpoint: str | None) -> None:
        if endpoint is None:
            return
        n = self._inflight.get(endpoint, 0) - 1
        if n > 0:
            self._inflight[endpoint] = n
        else:
            self._inflight.pop(endpoint, None)

    def inflight(self, endpoint: str) -> int:
        """Requests routed to ``endpoint`` whose response has not finished."""
        return self._inflight.get(endpoint, 0)

    @property
    def data_layer_plugins(self) -> list[Any]:
        """The config's data-source/extractor specs (for the metrics scraper)."""
        names = {s.plugin_ref for s in self.config.data_layer}
        names.update(e for s in self.config.data_layer for e in s.extractors)
        return [p for p in self.config.plugins if p.name in names]


def build_director(
    datastore: Datastore,
    *,
    config_path: str | Path | None = None,
    config_text: str | None = None,
    rng: random.Random | None = None,
    services: Mapping[str, object] | None = None,
    prepare_timeout_s: float = 0.4,
) -> EppDirector:
    """Load the config (file, text, or the built-in default) and build the director.

    ``services`` are shared objects for plugins (``BuildContext.services``), e.g. a
    KV-block index the data layer feeds. Raises :class:`epp.config.ConfigError`
    (message names the file and key) for any invalid configuration, including bad
    plugin parameters, data-layer parameters and ``engineConfigs`` metric specs.
    """
    if config_path is not None and config_text is not None:
        raise ValueError("give config_path or config_text, not both")
    if config_path is not None:
        config = load_config(config_path)
    elif config_text is not None:
        config = load_config_text(config_text)
    else:
        config = load_default_config()
    return EppDirector(
        datastore, config, rng=rng, services=services, prepare_timeout_s=prepare_timeout_s
    )


def _conforms(d: EppDirector, r: Decision) -> tuple[Director, RoutingDecision]:
    """Static check (mypy) that the classes implement the api protocols."""
    return d, r
