"""Summary statistics of one arm's request records (pure functions, no I/O).

A record (:class:`RequestRecord`) is what the load generator measured for one
request. :func:`summarize` turns a list of them into the numbers on the results
page. Definitions:

* percentiles: linear interpolation between closest ranks (numpy's default,
  "type 7"); an empty sample gives ``None``, never 0;
* TTFT: send -> first content token; ITL: gaps between consecutive content chunks
  of one stream, pooled over all successful requests; e2e: send -> last byte;
* output tokens/s: output tokens of successful requests / (last completion - first
  send): an arm that falls behind the offered load stretches its own window;
* goodput: successful requests with ``ttft <= slo.ttft_s`` and mean ITL ``<=
  slo.itl_s``, per second of the same window, and as a fraction of all requests;
* errors: every request that did not end 200 with a complete stream, by status
  (``0`` = no HTTP status: connection error or timeout); rejections are 429/503;
* balance: coefficient of variation (population std-dev / mean) of requests per
  endpoint; 0 is perfectly even.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(slots=True)
class RequestRecord:
    idx: int
    #: Planned and actual send offsets from the run start (s).
    planned_s: float
    sent_s: float
    status: int
    ok: bool
    ttft_s: float | None = None
    e2e_s: float | None = None
    output_tokens: int = 0
    prompt_tokens: int = 0
    #: Gaps between content chunks (s).
    itl_s: list[float] = field(default_factory=list)
    served_by: str | None = None
    error: str | None = None
    phase: int = 0
    group: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_json(d: Mapping[str, Any]) -> RequestRecord:
        return RequestRecord(**d)

    @property
    def itl_mean_s(self) -> float | None:
        return sum(self.itl_s) / len(self.itl_s) if self.itl_s else None


@dataclass(frozen=True, slots=True)
class Slo:
    ttft_s: float = 1.0
    itl_s: float = 0.05


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0..100) by linear interpolation; None when empty."""
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile: q must be in [0, 100], got {q}")
    if not values:
        return None
    xs = sorted(values)
    if len(xs) == 1:
        return float(xs[0])
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    frac = pos - lo
    return float(xs[lo] + (xs[hi] - xs[lo]) * frac)


def coefficient_of_variation(counts: Iterable[float]) -> float | None:
    xs = list(counts)
    if not xs:
        return None
    mean = sum(xs) / len(xs)
    if mean == 0:
        return None
    var = sum((x - mean) ** 2 for x in xs) / len(xs)
    return math.sqrt(var) / mean


def meets_slo(r: RequestRecord, slo: Slo) -> bool:
    if not r.ok or r.ttft_s is None or r.ttft_s > slo.ttft_s:
        return False
    m = r.itl_mean_s
    return m is None or m <= slo.itl_s


def _pcts(values: Sequence[float], qs: Sequence[int]) -> dict[str, float | None]:
    return {f"p{q}": percentile(values, q) for q in qs}


def summarize(
    records: Sequence[RequestRecord],
    slo: Slo,
    endpoints: Sequence[str] = (),
) -> dict[str, Any]:
    """The metrics of one arm (or one ramp phase). ``endpoints``: the fleet's
    addresses, so an endpoint that got nothing counts as 0 in the balance."""
    ok = [r for r in records if r.ok]
    ttft = [r.ttft_s for r in ok if r.ttft_s is not None]
    e2e = [r.e2e_s for r in ok if r.e2e_s is not None]
    itl = [g for r in ok for g in r.itl_s]
    out_tokens = sum(r.output_tokens for r in ok)
    if records:
        start = min(r.sent_s for r in records)
        end = max(r.sent_s + (r.e2e_s or 0.0) for r in records)
        window = max(end - start, 1e-9)
    else:
        window = 0.0
    good = sum(1 for r in records if meets_slo(r, slo))
    statuses = Counter(r.status for r in records if not r.ok)
    rejected = sum(n for s, n in statuses.items() if s in (429, 503))
    per_ep: Counter[str] = Counter({e: 0 for e in endpoints})
    for r in ok:
        if r.served_by:
            per_ep[r.served_by] += 1
    n = len(records)
    lag = [r.sent_s - r.planned_s for r in records]
    return {
        "requests": n,
        "succeeded": len(ok),
        "ttft_s": _pcts(ttft, (50, 90, 99)),
        "itl_s": _pcts(itl, (50, 90)),
        "e2e_s": _pcts(e2e, (50, 90)),
        "output_tokens": out_tokens,
        "window_s": window,
        "output_tokens_per_s": out_tokens / window if window else 0.0,
        "requests_per_s": len(ok) / window if window else 0.0,
        "goodput_rps": good / window if window else 0.0,
        "goodput_fraction": good / n if n else 0.0,
        "slo": asdict(slo),
        "errors": {str(s): c for s, c in sorted(statuses.items())},
        "error_rate": (n - len(ok)) / n if n else 0.0,
        "rejection_rate": rejected / n if n else 0.0,
        "per_endpoint": dict(sorted(per_ep.items())),
        "balance_cv": coefficient_of_variation(per_ep.values()) if per_ep else None,
        "send_lag_p99_s": percentile(lag, 99),
    }


def parse_prometheus_sums(text: str, names: Iterable[str]) -> dict[str, float]:
    """Sum each named sample over all its label sets (Prometheus text format)."""
    wanted = set(names)
    out = dict.fromkeys(wanted, 0.0)
    for line in text.splitlines():
        if not line or line[0] == "#":
            continue
        brace = line.find("{")
        space = line.find(" ")
        end = brace if 0 <= brace < space else space
        if end <= 0:
            continue
        name = line[:end]
        if name in wanted:
            try:
                out[name] += float(line.rsplit(" ", 1)[1] if brace < 0 else line.rsplit("}", 1)[1])
            except (ValueError, IndexError):
                continue
    return out


def hit_rate(hits: float, queries: float) -> float | None:
    return hits / queries if queries > 0 else None
