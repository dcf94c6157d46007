"""Profile runner, scheduler loop, and the builder from config to a ready pipeline.

One cycle: producers fill the :class:`CycleState`; then the profile handler's
``pick`` names profiles to run until it names none; each profile runs its filters
in order (stopping as soon as none is left), sums ``weight x clamp(score)`` over its
scorers, and lets its picker choose; finally ``process_results`` names the
primary profile. Scheduler and per-plugin latencies go to ``epp.metrics`` using
``time.perf_counter`` with pre-bound metric children (no label lookups per call).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from epp.config import ConfigError, EndpointPickerConfig
from epp.datastore import Datastore, EndpointView
from epp.errors import NoReadyEndpoint
from epp.metrics import PLUGIN_DURATION, SCHEDULER_ATTEMPTS, SCHEDULER_DURATION
from epp.metrics.fast import HistogramChild, observe_intervals
from epp.scheduling.registry import NOT_BUILT, BuildContext
from epp.scheduling.types import (
    CycleState,
    Filter,
    LLMRequest,
    Picker,
    Plugin,
    PrefixMatchProducer,
    PrepareData,
    PreRequest,
    Producer,
    ProfileHandler,
    ProfileRunResult,
    ResponseComplete,
    ResponseHeaders,
    SaturationDetector,
    SchedulerProfileLike,
    SchedulingResult,
    Scorer,
)

_perf = time.perf_counter


def _observer(extension_point: str, plugin: Plugin) -> Callable[[float], None]:
    child = PLUGIN_DURATION.labels(extension_point, plugin.type_name, plugin.name)
    observe: Callable[[float], None] = child.observe
    return observe


class SchedulerProfile(SchedulerProfileLike):
    """Filters, weighted scorers and one picker, run over the candidates."""

    def __init__(
        self,
        name: str,
        filters: Sequence[Filter],
        scorers: Sequence[tuple[Scorer, float]],
        picker: Picker,
    ) -> None:
        self.name = name
        self.filters = [(f, _observer("Filter", f)) for f in filters]
        self.scorers = [(s, w, _observer("Scorer", s)) for s, w in scorers if w > 0]
        self.picker = picker
        self._pick_obs = _observer("Picker", picker)

    @property
    def scorers(self) -> list[tuple[Scorer, float, Callable[[float], None]]]:
        """``(scorer, weight, latency observer)`` in configuration order (weight > 0)."""
        return self._scorers

    @scorers.setter
    def scorers(self, value: list[tuple[Scorer, float, Callable[[float], None]]]) -> None:
        self._scorers = list(value)
        # Columns of the same list, for the hot loop.
        self._score_fns = [s.score for s, _, _ in self._scorers]
        self._weights = [w for _, w, _ in self._scorers]
        self._score_obs = [obs for _, _, obs in self._scorers]
        self._unit = [getattr(s, "unit_scores", False) is True for s, _, _ in self._scorers]
        # The histogram children behind the observers, when every one is a plain
        # ``HistogramChild.observe`` (always, unless a test swaps one in).
        children = [getattr(obs, "__self__", None) for obs in self._score_obs]
        self._score_children: list[HistogramChild] | None = (
            children  # type: ignore[assignment]
            if all(type(c) is HistogramChild for c in children)
            else None
        )

    def run(
        self, cycle: CycleState, request: LLMRequest, endpoints: list[EndpointView]
    ) -> ProfileRunResult | None:
        candidates = endpoints
        if not candidates:
            cycle.rejections[self.name] = "no candidate endpoints"
            return None
        perf = _perf
        for f, obs in self.filters:
            t = perf()
            out = f.filter(cycle, request, candidates)
            obs(perf() - t)
            if not out:
                cycle.rejections[self.name] = (
                    f"filter {f.name!r} removed all {len(candidates)} candidates"
                )
                return None
            candidates = out
        # The scorers run back to back, one timestamp between consecutive calls;
        # their latencies are observed and their scores summed afterwards.
        lists: list[Sequence[float]] = []
        append = lists.append
        marks = [perf()]
        mark = marks.append
        for score in self._score_fns:
            append(score(cycle, request, candidates))
            mark(perf())
        if self._score_children is not None:
            observe_intervals(self._score_children, marks)
        else:
            for i, obs in enumerate(self._score_obs):
                obs(marks[i + 1] - marks[i])
        totals = weighted_totals(lists, self._weights, len(candidates), self._unit)
        t = perf()
        result = self.picker.pick(cycle, request, candidates, totals)
        self._pick_obs(perf() - t)
        if not result.targets:
            cycle.rejections[self.name] = f"picker {self.picker.name!r} chose nothing"
            return None
        return result


def _clamp(scores: Sequence[float]) -> list[float]:
    """NaN and values <= 0 -> 0.0, values >= 1 -> 1.0."""
    return [(v if v < 1.0 else 1.0) if v > 0.0 else 0.0 for v in scores]


def _add_terms(
    totals: list[float] | None, terms: Sequence[tuple[Sequence[float], float]]
) -> list[float]:
    """``totals[i] + w1*a[i] + w2*b[i] ...`` (left to right) for 1-4 terms; totals
    None stands for zeros (``0.0 + ...``: the same floats, one list fewer to zip).
    Every list has the same length (``weighted_totals`` sees to it): ``strict``
    checks would only cost time here."""
    k = len(terms)
    if k == 4:
        (a, wa), (b, wb), (c, wc), (d, wd) = terms
        if totals is None:
            return [
                0.0 + wa * x + wb * y + wc * z + wd * u
                for x, y, z, u in zip(a, b, c, d, strict=False)
            ]
        return [
            t + wa * x + wb * y + wc * z + wd * u
            for t, x, y, z, u in zip(totals, a, b, c, d, strict=False)
        ]
    if k == 3:
        (a, wa), (b, wb), (c, wc) = terms
        if totals is None:
            return [0.0 + wa * x + wb * y + wc * z for x, y, z in zip(a, b, c, strict=False)]
        return [t + wa * x + wb * y + wc * z for t, x, y, z in zip(totals, a, b, c, strict=False)]
    if k == 2:
        (a, wa), (b, wb) = terms
        if totals is None:
            return [0.0 + wa * x + wb * y for x, y in zip(a, b, strict=False)]
        return [t + wa * x + wb * y for t, x, y in zip(totals, a, b, strict=False)]
    ((a, wa),) = terms
    if totals is None:
        return [0.0 + wa * x for x in a]
    return [t + wa * x for t, x in zip(totals, a, strict=False)]


def weighted_totals(
    lists: Sequence[Sequence[float]],
    weights: Sequence[float],
    n: int,
    unit: Sequence[bool] | None = None,
) -> list[float]:
    """``sum(w * clamp(score))`` per candidate, scorers in order.

    ``clamp`` maps NaN and values <= 0 to 0 and values >= 1 to 1; lists whose
    ``unit`` flag is set (:attr:`Scorer.unit_scores`) are already in range and
    are not clamped. Each total is accumulated left to right over the scorers
    (``0.0 + w1*s1 + w2*s2 ...``, ``t + w*0.0 == t``) and an all-zero list is
    skipped, so the floats are exactly those of a plain per-candidate loop. Up to
    four lists are added per pass over the candidates. A list shorter than ``n``
    raises IndexError; extra entries are ignored.
    """
    terms: list[tuple[Sequence[float], float]] = []
    for j, (given, w) in enumerate(zip(lists, weights, strict=True)):
        # A wrong length: IndexError when short, extra entries ignored.
        scores = given if len(given) == n else [given[i] for i in range(n)]
        if not any(scores):  # all 0.0 (no prefix match, no session): adds 0
            continue
        terms.append((scores if unit is not None and unit[j] else _clamp(scores), w))
    if not terms:
        return [0.0] * n
    totals: list[float] | None = None
    for i in range(0, len(terms), 4):
        totals = _add_terms(totals, terms[i : i + 4])
    assert totals is not None
    return totals


class Scheduler:
    """Runs producers, then profiles as the profile handler directs."""

    def __init__(
        self,
        handler: ProfileHandler,
        profiles: Mapping[str, SchedulerProfile],
        producers: Sequence[Producer] = (),
    ) -> None:
        self.handler = handler
        self.profiles = dict(profiles)
        self.producers = [(p, _observer("Producer", p)) for p in producers]
        self._handler_obs = _observer("ProfileHandler", handler)
        self._ok = SCHEDULER_ATTEMPTS.labels("success")
        self._fail = SCHEDULER_ATTEMPTS.labels("failure")

    def schedule(
        self, request: LLMRequest, endpoints: list[EndpointView], cycle: CycleState | None = None
    ) -> tuple[SchedulingResult, CycleState]:
        """Pick endpoints for ``request``; raises NoReadyEndpoint when none fits."""
        t0 = _perf()
        cycle = cycle or CycleState()
        try:
            for p, obs in self.producers:
                t = _perf()
                p.produce(cycle, request, endpoints)
                obs(_perf() - t)
            results: dict[str, ProfileRunResult | None] = {}
            profiles = self.profiles
            for _ in range(len(profiles) + 1):
                t = _perf()
                names = self.handler.pick(cycle, request, profiles, results)
                self._handler_obs(_perf() - t)
                if not names:
                    break
                for name in names:
                    if name in results:
                        raise RuntimeError(f"profile handler picked profile {name!r} twice")
                    results[name] = profiles[name].run(cycle, request, endpoints)
            else:
                raise RuntimeError("profile handler did not stop picking profiles")
            result = self.handler.process_results(cycle, request, results)
        except Exception:
            self._fail.inc()
            SCHEDULER_DURATION.observe(_perf() - t0)
            raise
        self._ok.inc()
        SCHEDULER_DURATION.observe(_perf() - t0)
        return result, cycle


def no_endpoint_error(cycle: CycleState, profile: str) -> NoReadyEndpoint:
    why = cycle.rejections.get(profile, "no endpoint")
    return NoReadyEndpoint(f"failed to find an endpoint for profile {profile!r}: {why}")


@dataclass
class Pipeline:
    """Everything request control needs, built from one config."""

    config: EndpointPickerConfig
    scheduler: Scheduler
    saturation_detector: SaturationDetector
    plugins: dict[str, Plugin]
    prepare_data: list[PrepareData] = field(default_factory=list)
    pre_request: list[PreRequest] = field(default_factory=list)
    response_headers: list[ResponseHeaders] = field(default_factory=list)
    response_complete: list[ResponseComplete] = field(default_factory=list)

    @property
    def needs_response_body(self) -> bool:
        return any(p.needs_response_body for p in self.plugins.values())

    @property
    def needs_response_phase(self) -> bool:
        """Whether any plugin needs the gateway to send response headers (or bodies)
        to the EPP. Session tokens do not: they also travel in the routing metadata."""
        return self.needs_response_body or any(
            p.needs_response_phase for p in self.plugins.values()
        )

    def plugin(self, name: str) -> Any:
        return self.plugins[name]


def needs_response_phase(config: EndpointPickerConfig) -> bool:
    """Whether ``config``'s plugins need the gateway to send response headers to the
    EPP (:attr:`Pipeline.needs_response_phase`). Builds the plugins without starting
    them (no sockets, no tasks): for deployment tooling such as ``pdroute up``."""
    return build_pipeline(config).needs_response_phase


def build_pipeline(
    config: EndpointPickerConfig,
    *,
    datastore: Datastore | None = None,
    rng: random.Random | None = None,
    services: Mapping[str, object] | None = None,
) -> Pipeline:
    """Instantiate and wire every plugin of ``config`` (raises ConfigError)."""
    import epp.scheduling.plugins  # noqa: F401  (registers the built-in types)

    ctx = BuildContext(config, datastore=datastore, rng=rng, services=services)
    for spec in config.plugins:
        if spec.kind not in NOT_BUILT:
            ctx.build(spec)
    built = ctx.built

    profiles: dict[str, SchedulerProfile] = {}
    for prof in config.scheduling_profiles:
        filters: list[Filter] = []
        scorers: list[tuple[Scorer, float]] = []
        picker: Picker | None = None
        for ref in prof.plugins:
            plugin = built[ref.plugin_ref]
            if isinstance(plugin, Filter):
                filters.append(plugin)
            elif isinstance(plugin, Scorer):
                scorers.append((plugin, ref.weight))
            elif isinstance(plugin, Picker):
                picker = plugin
            else:  # pragma: no cover - the loader admits only these kinds
                raise ConfigError(
                    config.source, f"{ref.path}.pluginRef", "not a filter, scorer or picker"
                )
        assert picker is not None  # the loader adds max-score-picker
        profiles[prof.name] = SchedulerProfile(prof.name, filters, scorers, picker)

    handler = built[config.profile_handler]
    assert isinstance(handler, ProfileHandler)
    handler.validate_profiles(list(profiles), ctx)

    detector = built[config.saturation_detector]
    assert isinstance(detector, SaturationDetector)

    everything: dict[str, Plugin] = dict(built)
    for p in ctx.implicit:
        everything.setdefault(p.name, p)
    # Producers run in declaration order; prefix producers first (others may read them).
    producers = [p for p in everything.values() if isinstance(p, Producer)]
    producers.sort(key=lambda p: 0 if isinstance(p, PrefixMatchProducer) else 1)

    return Pipeline(
        config=config,
        scheduler=Scheduler(handler, profiles, producers),
        saturation_detector=detector,
        plugins=everything,
        prepare_data=[p for p in everything.values() if isinstance(p, PrepareData)],
        pre_request=[p for p in everything.values() if isinstance(p, PreRequest)],
        response_headers=[p for p in everything.values() if isinstance(p, ResponseHeaders)],
        response_complete=[p for p in everything.values() if isinstance(p, ResponseComplete)],
    )


__all__ = [
    "Pipeline",
    "Scheduler",
    "SchedulerProfile",
    "build_pipeline",
    "no_endpoint_error",
    "weighted_totals",
]
