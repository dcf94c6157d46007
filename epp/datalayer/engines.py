"""Per-engine metric-name mappings: which Prometheus series feed :class:`EndpointMetrics`.

A mapping names, per scheduling input, a *spec* in PromQL instant-selector syntax
restricted to equality matchers: ``name`` or ``name{label=value,other="v"}`` (quotes
optional, as in llm-d). Built-in mappings cover vLLM (default), SGLang, trtllm-serve
and Triton with the TensorRT-LLM backend; ``engineConfigs`` adds engines or replaces
built-ins, in llm-d's shape (a list of ``{name, queuedRequestsSpec, ...}``) or keyed by
engine name (``{my-engine: {queuedRequestsSpec: ...}}``).

Extraction rules (documented in README.md):

* queue / running: the sum over all matching series (one ``/metrics`` page may carry
  several engine cores, e.g. vLLM's ``engine="0"``, ``engine="1"``);
* KV-cache usage: the largest matching value, clamped to 0..1;
* LoRA info: the series with the largest value (its value is the last-update time);
* cache info: label values of the first matching info series, or gauges when the
  ``cacheBlockSizeSpec``/``cacheNumBlocksSpec`` form is used.

A configured queue/running/KV spec missing from a scrape is an error (the endpoint's
metrics then go stale, which the scheduler treats as saturated); LoRA and cache info
are optional (vLLM exports LoRA info only with LoRA enabled).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from epp.datalayer.promtext import MetricsParseError, Sample, parse_selected
from epp.datastore import Endpoint, EndpointMetrics

#: Endpoint label that selects the engine (Gateway API Inference Extension name),
#: and llm-d's newer spelling; the first present wins.
ENGINE_LABELS = ("inference.networking.k8s.io/engine-type", "llm-d.ai/engine-type")

_SPEC = re.compile(r"\s*([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(?:\{(.*)\})?\s*\Z", re.S)
_MATCHER = re.compile(
    r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*=(?![~=])\s*("(?:[^"\\]|\\.)*"|[^",}\s~]+)\s*(?:,|\Z)'
)


class EngineConfigError(ValueError):
    """An engine config is invalid; ``key`` names the offending entry."""

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        self.problem = message
        super().__init__(f"{key}: {message}")


class MissingMetricError(MetricsParseError):
    """A required metric is absent from a scrape."""


@dataclass(frozen=True, slots=True)
class Spec:
    """One metric selector: a sample name plus equality label matchers."""

    name: str
    labels: tuple[tuple[str, str], ...] = ()

    def matching(self, families: Mapping[str, list[Sample]]) -> list[Sample]:
        samples = families.get(self.name, [])
        if not self.labels:
            return samples
        return [s for s in samples if all(s[0].get(k) == v for k, v in self.labels)]

    def __str__(self) -> str:
        if not self.labels:
            return self.name
        return self.name + "{" + ",".join(f'{k}="{v}"' for k, v in self.labels) + "}"


def parse_spec(text: str, key: str = "spec") -> Spec:
    """Parse ``name{label=value,...}``. Raises :class:`EngineConfigError`."""
    m = _SPEC.match(text)
    if not m:
        raise EngineConfigError(key, f"not a metric selector: {text!r}")
    name, body = m.group(1), m.group(2)
    labels: list[tuple[str, str]] = []
    if body is not None and body.strip():
        pos = 0
        while pos < len(body):
            mm = _MATCHER.match(body, pos)
            if not mm or mm.end() == pos:
                raise EngineConfigError(
                    key, f"bad label matcher in {text!r} (only label=value is supported)"
                )
            value = mm.group(2)
            if value.startswith('"'):
                value = re.sub(r"\\(.)", r"\1", value[1:-1])
            labels.append((mm.group(1), value))
            pos = mm.end()
    return Spec(name, tuple(labels))


@dataclass(frozen=True, slots=True)
class EngineMapping:
    """Where one engine's scheduling inputs live in its /metrics."""

    queued: Spec | None = None
    running: Spec | None = None
    kv_usage: Spec | None = None
    lora: Spec | None = None
    cache_info: Spec | None = None
    cache_block_size_label: str = "block_size"
    cache_num_blocks_label: str = "num_gpu_blocks"
    cache_hash_algo_label: str = "prefix_caching_hash_algo"
    cache_block_size: Spec | None = None
    cache_num_blocks: Spec | None = None
    #: Every sample name this mapping reads (what the selective parser looks for).
    wanted: frozenset[str] = field(init=False)
    #: ``name[]=...`` query asking the engine for exactly ``wanted`` (prometheus_client's
    #: filter: vLLM and SGLang serve only those samples, others ignore it).
    name_query: str = field(init=False)

    def __post_init__(self) -> None:
        specs = (
            self.queued,
            self.running,
            self.kv_usage,
            self.lora,
            self.cache_info,
            self.cache_block_size,
            self.cache_num_blocks,
        )
        wanted = frozenset(s.name for s in specs if s is not None)
        object.__setattr__(self, "wanted", wanted)
        query = "&".join("name%5B%5D=" + quote(n, safe="") for n in sorted(wanted))
        object.__setattr__(self, "name_query", query)

    def parse(self, text: str) -> EndpointMetrics:
        """Parse a /metrics page into metrics (``updated_at`` left 0)."""
        return self.extract(parse_selected(text, self.wanted))

    def extract(self, families: Mapping[str, list[Sample]]) -> EndpointMetrics:
        waiting = self._count(self.queued, families)
        running = self._count(self.running, families)
        kv = 0.0
        if self.kv_usage is not None:
            vals = [v for _, v in self._required(self.kv_usage, families) if not math.isnan(v)]
            if not vals:
                raise MissingMetricError(f"{self.kv_usage} has only NaN values")
            kv = min(1.0, max(0.0, *vals))
        active: frozenset[str] = frozenset()
        waiting_loras: frozenset[str] = frozenset()
        max_loras = 0
        if self.lora is not None:
            series = self.lora.matching(families)
            if series:
                labels, _ = max(series, key=lambda s: s[1] if not math.isnan(s[1]) else -math.inf)
                active = _split_names(labels.get("running_lora_adapters", ""))
                waiting_loras = _split_names(labels.get("waiting_lora_adapters", ""))
                max_loras = _int_or(labels.get("max_lora"), 0) or 0
        block_size: int | None = None
        num_blocks: int | None = None
        hash_algo: str | None = None
        if self.cache_info is not None:
            series = self.cache_info.matching(families)
            if series:
                labels = series[0][0]
                block_size = _int_or(labels.get(self.cache_block_size_label), None)
                num_blocks = _int_or(labels.get(self.cache_num_blocks_label), None)
                algo = labels.get(self.cache_hash_algo_label)
                hash_algo = algo if algo and algo != "None" else None
        if self.cache_block_size is not None:
            series = self.cache_block_size.matching(families)
            if series and math.isfinite(series[0][1]):
                block_size = int(series[0][1])
        if self.cache_num_blocks is not None:
            series = self.cache_num_blocks.matching(families)
            if series and math.isfinite(series[0][1]):
                num_blocks = int(series[0][1])
        return EndpointMetrics(
            waiting=waiting,
            running=running,
            kv_cache_usage=kv,
            active_loras=active,
            waiting_loras=waiting_loras,
            max_loras=max_loras,
            block_size=block_size,
            num_blocks=num_blocks,
            hash_algo=hash_algo,
        )

    @staticmethod
    def _required(spec: Spec, families: Mapping[str, list[Sample]]) -> list[Sample]:
        series = spec.matching(families)
        if not series:
            raise MissingMetricError(f"metric {spec} not found")
        return series

    def _count(self, spec: Spec | None, families: Mapping[str, list[Sample]]) -> int:
        if spec is None:
            return 0
        total = 0.0
        for _, v in self._required(spec, families):
            if math.isfinite(v):
                total += v
        return max(0, round(total))


def _split_names(value: str) -> frozenset[str]:
    return frozenset(p.strip() for p in value.split(",") if p.strip())


def _int_or(value: str | None, default: int | None) -> int | None:
    if value is None:
        return default
    try:
        return int(float(value))
    except (ValueError, OverflowError):
        return default


def _s(text: str) -> Spec:
    return parse_spec(text)


VLLM = EngineMapping(
    queued=_s("vllm:num_requests_waiting"),
    running=_s("vllm:num_requests_running"),
    kv_usage=_s("vllm:kv_cache_usage_perc"),
    lora=_s("vllm:lora_requests_info"),
    cache_info=_s("vllm:cache_config_info"),
)
SGLANG = EngineMapping(
    queued=_s("sglang:num_queue_reqs"),
    running=_s("sglang:num_running_reqs"),
    kv_usage=_s("sglang:token_usage"),
    cache_info=_s("sglang:cache_config_info"),
    cache_block_size_label="page_size",
    cache_num_blocks_label="num_pages",
    # Newer SGLang exports plain gauges; when present they win over the info labels.
    cache_block_size=_s("sglang:page_size"),
    cache_num_blocks=_s("sglang:num_pages"),
)
TRTLLM_SERVE = EngineMapping(
    queued=_s("trtllm_num_requests_waiting"),
    running=_s("trtllm_num_requests_running"),
    kv_usage=_s("trtllm_kv_cache_utilization"),
    cache_block_size=_s("trtllm_kv_cache_tokens_per_block"),
    cache_num_blocks=_s("trtllm_kv_cache_max_blocks"),
)
TRITON_TRTLLM = EngineMapping(
    queued=_s("nv_trt_llm_request_metrics{request_type=waiting}"),
    running=_s("nv_trt_llm_request_metrics{request_type=scheduled}"),
    kv_usage=_s("nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type=fraction}"),
    cache_block_size=_s("nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type=tokens_per}"),
    cache_num_blocks=_s("nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type=max}"),
)

BUILTIN_ENGINES: Mapping[str, EngineMapping] = {
    "vllm": VLLM,
    "sglang": SGLANG,
    "trtllm-serve": TRTLLM_SERVE,
    "trtllm": TRTLLM_SERVE,
    "triton-tensorrt-llm": TRITON_TRTLLM,
}

#: engineConfigs keys (llm-d's names) -> EngineMapping fields.
_SPEC_KEYS = {
    "queuedRequestsSpec": "queued",
    "runningRequestsSpec": "running",
    "kvUsageSpec": "kv_usage",
    "loraSpec": "lora",
    "cacheInfoSpec": "cache_info",
    "cacheBlockSizeSpec": "cache_block_size",
    "cacheNumBlocksSpec": "cache_num_blocks",
}
_LABEL_KEYS = {
    "cacheBlockSizeLabelName": "cache_block_size_label",
    "cacheNumBlocksLabelName": "cache_num_blocks_label",
    "cacheHashAlgoLabelName": "cache_hash_algo_label",
}


def _mapping_from(raw: Any, key: str) -> EngineMapping:
    if not isinstance(raw, Mapping):
        raise EngineConfigError(key, "must be a mapping of spec keys")
    kwargs: dict[str, Any] = {}
    for k, v in raw.items():
        if k == "name":
            continue
        if k in _SPEC_KEYS:
            if v is None or v == "":
                kwargs[_SPEC_KEYS[k]] = None  # explicitly disabled
            elif isinstance(v, str):
                kwargs[_SPEC_KEYS[k]] = parse_spec(v, f"{key}.{k}")
            else:
                raise EngineConfigError(f"{key}.{k}", f"must be a string, got {v!r}")
        elif k in _LABEL_KEYS:
            if not isinstance(v, str) or not v:
                raise EngineConfigError(f"{key}.{k}", "must be a non-empty string")
            kwargs[_LABEL_KEYS[k]] = v
        else:
            allowed = ", ".join(sorted([*_SPEC_KEYS, *_LABEL_KEYS]))
            raise EngineConfigError(f"{key}.{k}", f"unknown key (allowed: name, {allowed})")
    return EngineMapping(**kwargs)


def build_engine_mappings(
    engine_configs: Any = None, *, key: str = "engineConfigs"
) -> dict[str, EngineMapping]:
    """Built-in mappings overlaid with ``engine_configs`` (llm-d list shape or a
    mapping keyed by engine name). An entry named like a built-in replaces it
    entirely; unset specs of a user entry are disabled, not inherited."""
    out = dict(BUILTIN_ENGINES)
    if engine_configs is None:
        return out
    if isinstance(engine_configs, Mapping):
        items = [(str(name), cfg, f"{key}.{name}") for name, cfg in engine_configs.items()]
    elif isinstance(engine_configs, list | tuple):
        items = []
        for i, cfg in enumerate(engine_configs):
            name = cfg.get("name") if isinstance(cfg, Mapping) else None
            if not isinstance(name, str) or not name:
                raise EngineConfigError(f"{key}[{i}].name", "missing or not a string")
            items.append((name, cfg, f"{key}[{i}]"))
    else:
        raise EngineConfigError(key, "must be a list of engine configs or a mapping by name")
    for name, cfg, k in items:
        out[name] = _mapping_from(cfg, k)
    return out


def engine_of(endpoint: Endpoint, default: str, labels: tuple[str, ...] = ENGINE_LABELS) -> str:
    """The endpoint's engine: its ``engine`` field, else the first of ``labels`` set."""
    if endpoint.engine:
        return endpoint.engine
    for label in labels:
        value = endpoint.labels.get(label)
        if value:
            return value
    return default
