"""Percentiles, goodput, balance, Prometheus sums: the math behind the results page."""

from __future__ import annotations

import math

import pytest

from pdroute.bench.stats import (
    RequestRecord,
    Slo,
    coefficient_of_variation,
    hit_rate,
    meets_slo,
    parse_prometheus_sums,
    percentile,
    summarize,
)


def test_percentile_interpolates_like_numpy_default() -> None:
    xs = [1.0, 2.0, 3.0, 4.0]
    assert percentile(xs, 0) == 1.0
    assert percentile(xs, 100) == 4.0
    assert percentile(xs, 50) == 2.5
    assert percentile(xs, 90) == pytest.approx(3.7)
    assert percentile([4.0, 1.0, 3.0, 2.0], 90) == pytest.approx(3.7)  # unsorted input
    assert percentile([7.0], 99) == 7.0
    assert percentile([], 50) is None
    with pytest.raises(ValueError, match="q must be"):
        percentile(xs, 101)


def test_cv() -> None:
    assert coefficient_of_variation([5, 5, 5, 5]) == 0.0
    # mean 2, population std 2 -> 1.0
    assert coefficient_of_variation([0, 4, 0, 4]) == pytest.approx(1.0)
    assert coefficient_of_variation([]) is None
    assert coefficient_of_variation([0, 0]) is None


def rec(
    idx: int, ttft: float | None, itl: list[float], ok: bool = True, **kw: object
) -> RequestRecord:
    e2e = (ttft or 0.0) + sum(itl)
    return RequestRecord(
        idx=idx,
        planned_s=float(idx),
        sent_s=float(idx),
        status=int(kw.pop("status", 200)),  # type: ignore[call-overload]
        ok=ok,
        ttft_s=ttft,
        e2e_s=e2e,
        output_tokens=len(itl) + 1 if ok else 0,
        itl_s=itl,
        **kw,  # type: ignore[arg-type]
    )


def test_slo_needs_success_ttft_and_mean_itl() -> None:
    slo = Slo(ttft_s=0.5, itl_s=0.02)
    assert meets_slo(rec(0, 0.4, [0.01, 0.03]), slo)  # mean ITL 0.02
    assert not meets_slo(rec(0, 0.6, [0.01]), slo)
    assert not meets_slo(rec(0, 0.4, [0.03, 0.03]), slo)
    assert not meets_slo(rec(0, 0.1, [0.01], ok=False, status=503), slo)
    assert meets_slo(rec(0, 0.1, []), slo)  # single-token output: no ITL to judge


def test_summarize_counts_errors_goodput_and_balance() -> None:
    slo = Slo(ttft_s=0.5, itl_s=0.05)
    recs = [
        rec(0, 0.1, [0.01] * 4, served_by="a"),
        rec(1, 0.2, [0.01] * 4, served_by="a"),
        rec(2, 0.9, [0.01] * 4, served_by="b"),  # misses the TTFT SLO
        rec(3, None, [], ok=False, status=429),
        rec(4, None, [], ok=False, status=0, error="ClientConnectorError"),
    ]
    s = summarize(recs, slo, endpoints=["a", "b", "c"])
    assert s["requests"] == 5 and s["succeeded"] == 3
    assert s["errors"] == {"0": 1, "429": 1}
    assert s["error_rate"] == pytest.approx(0.4)
    assert s["rejection_rate"] == pytest.approx(0.2)
    assert s["goodput_fraction"] == pytest.approx(0.4)
    assert s["per_endpoint"] == {"a": 2, "b": 1, "c": 0}
    assert s["balance_cv"] == pytest.approx(coefficient_of_variation([2, 1, 0]))
    assert s["ttft_s"]["p50"] == pytest.approx(0.2)
    assert s["itl_s"]["p90"] == pytest.approx(0.01)
    assert s["output_tokens"] == 15
    # window: first send (0) to last completion (send 4 + e2e 0) vs request 2's end (2.94)
    assert s["window_s"] == pytest.approx(4.0)
    assert s["output_tokens_per_s"] == pytest.approx(15 / 4.0)
    assert s["goodput_rps"] == pytest.approx(2 / 4.0)


def test_summarize_empty() -> None:
    s = summarize([], Slo())
    assert s["requests"] == 0 and s["ttft_s"]["p50"] is None and s["output_tokens_per_s"] == 0.0


def test_prometheus_sums_over_labels() -> None:
    text = "\n".join(
        [
            "# HELP vllm:prefix_cache_hits_total x",
            "# TYPE vllm:prefix_cache_hits_total counter",
            'vllm:prefix_cache_hits_total{engine="0",model_name="m"} 120.0',
            'vllm:prefix_cache_hits_total{engine="1",model_name="m"} 30.0',
            "vllm:prefix_cache_queries_total 400",
            'vllm:prefix_cache_hits_created{engine="0"} 1.7e9',
            'vllm:request_success_total{finished_reason="length"} 7',
            'vllm:request_success_total{finished_reason="stop"} 3',
            "garbage line",
        ]
    )
    got = parse_prometheus_sums(
        text,
        [
            "vllm:prefix_cache_hits_total",
            "vllm:prefix_cache_queries_total",
            "vllm:request_success_total",
            "vllm:missing_total",
        ],
    )
    assert got == {
        "vllm:prefix_cache_hits_total": 150.0,
        "vllm:prefix_cache_queries_total": 400.0,
        "vllm:request_success_total": 10.0,
        "vllm:missing_total": 0.0,
    }


def test_hit_rate() -> None:
    assert hit_rate(25, 100) == 0.25
    assert hit_rate(0, 0) is None
    assert not math.isnan(hit_rate(0, 1) or 0.0)


def test_record_json_round_trip() -> None:
    r = rec(3, 0.1, [0.01, 0.02], served_by="x", group="g1", phase=2)
    assert RequestRecord.from_json(r.to_json()) == r
    assert r.itl_mean_s == pytest.approx(0.015)


def test_combine_repeats_reports_the_median_run_and_every_run() -> None:
    from pdroute.bench.runner import combine_repeats

    def run(p90: float) -> dict[str, object]:
        return {
            "status": "ok",
            "summary": {"ttft_s": {"p90": p90}, "output_tokens_per_s": 100 / p90},
            "prefix_cache": {"hit_rate": 0.5},
        }

    got = combine_repeats([run(3.0), {"status": "failed", "reason": "boom"}, run(1.0), run(2.0)])
    assert got["summary"]["ttft_s"]["p90"] == 2.0
    assert [r["ttft_p90_s"] for r in got["repeats"]] == [3.0, None, 1.0, 2.0]
    assert got["repeats"][1] == {
        "status": "failed",
        "ttft_p90_s": None,
        "output_tokens_per_s": None,
        "hit_rate": None,
        "reason": "boom",
    }
    assert combine_repeats([{"status": "failed", "reason": "x"}])["status"] == "failed"
    assert "repeats" not in combine_repeats([run(1.0)])
