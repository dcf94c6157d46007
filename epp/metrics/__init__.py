"""The EPP's own Prometheus metrics, in one registry served on :9090.

Names follow llm-d's canonical ``llm_d_epp_*`` prefix. Every layer records into
the objects below; only ``epp.server`` exposes them. Label sets are bounded:
endpoint labels are ``ip:port`` of pool members (removed with the endpoint).

Metrics recorded on every request (request counts and durations, scheduler and
plugin latencies, prefix hit ratio, P/D decisions) are :mod:`epp.metrics.fast`
collectors: same exposition as ``prometheus_client``'s, a tenth of the cost per
observation. The rest are ordinary ``prometheus_client`` metrics.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

from epp.metrics.fast import FastCounter, FastHistogram

REGISTRY = CollectorRegistry(auto_describe=True)

_FAST_BUCKETS = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
)  # fmt: skip
_REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

REQUESTS = FastCounter(
    "llm_d_epp_requests", "Requests seen by the EPP.", ["model_name"], registry=REGISTRY
)
REQUEST_ERRORS = Counter(
    "llm_d_epp_request_errors",
    "Requests answered with an error by the EPP, by HTTP status code.",
    ["model_name", "error_code"],
    registry=REGISTRY,
)
REQUEST_DURATION = FastHistogram(
    "llm_d_epp_request_duration_seconds",
    "End-to-end request duration as seen by the EPP (request headers to response end).",
    ["model_name"],
    buckets=_REQUEST_BUCKETS,
    registry=REGISTRY,
)
REQUEST_PROCESSING = FastHistogram(
    "llm_d_epp_request_processing_duration_seconds",
    "EPP overhead on the request path: body complete to routing answer sent.",
    buckets=_FAST_BUCKETS,
    registry=REGISTRY,
)
SCHEDULER_DURATION = FastHistogram(
    "llm_d_epp_scheduler_e2e_duration_seconds",
    "Scheduling latency: profile handler, filters, scorers and pickers.",
    buckets=_FAST_BUCKETS,
    registry=REGISTRY,
)
SCHEDULER_ATTEMPTS = FastCounter(
    "llm_d_epp_scheduler_attempts", "Scheduling attempts by outcome.", ["status"], registry=REGISTRY
)
PLUGIN_DURATION = FastHistogram(
    "llm_d_epp_plugin_duration_seconds",
    "Per-plugin latency.",
    ["extension_point", "plugin_type", "plugin_name"],
    buckets=_FAST_BUCKETS,
    registry=REGISTRY,
)
DISAGG_DECISIONS = FastCounter(
    "llm_d_epp_disagg_decision",
    "Prefill/decode disaggregation decisions by outcome and reason.",
    ["decision", "reason"],
    registry=REGISTRY,
)
PREFIX_INDEX_SIZE = Gauge(
    "llm_d_epp_prefix_indexer_size",
    "Blocks held in the prefix index.",
    ["index"],
    registry=REGISTRY,
)
PREFIX_HIT_RATIO = FastHistogram(
    "llm_d_epp_prefix_indexer_hit_ratio",
    "Fraction of a request's prefix blocks found on the chosen endpoint.",
    ["index"],
    buckets=(0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0),
    registry=REGISTRY,
)
POOL_READY_ENDPOINTS = Gauge(
    "llm_d_epp_pool_ready_endpoints", "Ready endpoints by role.", ["role"], registry=REGISTRY
)
POOL_AVG_QUEUE = Gauge(
    "llm_d_epp_pool_average_queue_size",
    "Average waiting requests by role.",
    ["role"],
    registry=REGISTRY,
)
POOL_AVG_KV = Gauge(
    "llm_d_epp_pool_average_kv_cache_utilization",
    "Average KV-cache utilization (0-1) by role.",
    ["role"],
    registry=REGISTRY,
)
ENDPOINT_QUEUE = Gauge(
    "llm_d_epp_endpoint_queue_size",
    "Waiting requests per endpoint.",
    ["endpoint", "role"],
    registry=REGISTRY,
)
ENDPOINT_RUNNING = Gauge(
    "llm_d_epp_endpoint_running_requests",
    "Running requests per endpoint.",
    ["endpoint", "role"],
    registry=REGISTRY,
)
ENDPOINT_KV = Gauge(
    "llm_d_epp_endpoint_kv_cache_utilization",
    "KV-cache utilization per endpoint.",
    ["endpoint", "role"],
    registry=REGISTRY,
)
DATALAYER_POLL_ERRORS = Counter(
    "llm_d_epp_datalayer_poll_errors",
    "Failed metric scrapes per endpoint.",
    ["endpoint"],
    registry=REGISTRY,
)
KV_EVENTS = Counter(
    "llm_d_epp_kv_events", "KV events ingested, by outcome.", ["outcome"], registry=REGISTRY
)
