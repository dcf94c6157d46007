"""The sidecar's Prometheus metrics, in their own registry (served on ``--metrics-port``).

Names start with ``pdroute_sidecar_``. ``leg`` is ``prefill`` or ``decode``;
``mode`` is how a request was served: ``pd`` (prefill + decode), ``local`` (no
prefiller header), ``fallback`` (prefill failed, decoded locally),
``passthrough`` (not a completion API: reverse-proxied).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

_LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
_OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1)


class SidecarMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "pdroute_sidecar_requests",
            "Requests handled, by serving mode and final HTTP status class.",
            ["mode", "code"],
            registry=r,
        )
        self.leg_duration = Histogram(
            "pdroute_sidecar_leg_duration_seconds",
            "Prefill leg: until its answer is read. Decode leg: until response headers.",
            ["leg"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.leg_failures = Counter(
            "pdroute_sidecar_leg_failures",
            "Failed leg attempts, by reason (connect, timeout, http_<status>, bad_answer).",
            ["leg", "reason"],
            registry=r,
        )
        self.prefill_retries = Counter(
            "pdroute_sidecar_prefill_retries", "Prefill leg retries.", registry=r
        )
        self.fallbacks = Counter(
            "pdroute_sidecar_prefill_fallbacks",
            "Requests decoded locally because the prefill leg failed (--on-prefill-failure=local).",
            ["reason"],
            registry=r,
        )
        self.rejected = Counter(
            "pdroute_sidecar_rejected_requests",
            "Requests refused by the sidecar itself, by reason (ssrf, bad_header, bad_json, too_large).",
            ["reason"],
            registry=r,
        )
        self.added_latency = Histogram(
            "pdroute_sidecar_added_latency_seconds",
            "Time to response headers spent in the sidecar itself (total minus upstream waits).",
            buckets=_OVERHEAD_BUCKETS,
            registry=r,
        )
        self.time_to_headers = Histogram(
            "pdroute_sidecar_time_to_headers_seconds",
            "From request arrival to response headers sent, including both legs.",
            ["mode"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
