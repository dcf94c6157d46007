"""Real P/D: two vLLM-CPU processes with NixlConnector, ``pdroute sidecar`` in front of
decode. The KV cache really moves over NIXL; greedy output must equal a single
instance's output token for token."""

from __future__ import annotations

from collections.abc import Iterator

import orjson
import pytest
from pd_vllm_helpers import PdPair, SidecarProc, http, metric, post_json

from tests.netutil import free_port

# vLLM start-up (session fixture) counts against the first test: allow a busy machine.
pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.timeout(1200)]

#: Several 128-token blocks of prompt (CPU block size), so NIXL moves real blocks.
LONG_A = "Disaggregated serving splits prefill and decode across pods. " * 45
LONG_B = "The quick brown fox jumps over the lazy dog while the prefill pod works. " * 40
LONG_C = "Once upon a time there was a tiny language model that lived on a CPU. " * 40
SHORT = "Hello world! How are you today?"
N_TOKENS = 24


@pytest.fixture(scope="module")
def sidecars(
    vllm_pd: PdPair, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, SidecarProc]]:
    d = tmp_path_factory.mktemp("sidecars")
    dead_port = free_port()  # a pool member whose prefill pod is gone
    eps = d / "endpoints.yaml"
    eps.write_text(
        "endpoints:\n"
        f"  - {{name: prefill-0, address: 127.0.0.1, port: {vllm_pd.prefill.spec.port},"
        " labels: {llm-d.ai/role: prefill}}\n"
        f"  - {{name: prefill-dead, address: 127.0.0.1, port: {dead_port},"
        " labels: {llm-d.ai/role: prefill}}\n"
    )
    procs = {
        "local": SidecarProc(vllm_pd.decode.spec.port, eps, d),
        "error": SidecarProc(vllm_pd.decode.spec.port, eps, d, "--on-prefill-failure", "error"),
    }
    procs["local"].dead_prefiller = f"127.0.0.1:{dead_port}"  # type: ignore[attr-defined]
    try:
        yield procs
    finally:
        codes = [p.stop() for p in procs.values()]
    assert codes == [0, 0], "sidecars must exit 0 on SIGTERM"


def _completion(url: str, model: str, prompt: str, headers: dict[str, str] | None = None) -> dict:  # type: ignore[type-arg]
    body = {"model": model, "prompt": prompt, "max_tokens": N_TOKENS, "temperature": 0, "seed": 0}
    return post_json(f"{url}/v1/completions", body, headers)


def _tokens(doc: dict) -> str:  # type: ignore[type-arg]
    return str(doc["choices"][0]["text"])


def test_pd_through_sidecar_equals_single_instance(
    vllm_pd: PdPair, sidecars: dict[str, SidecarProc]
) -> None:
    p_srv, d_srv, model = vllm_pd.prefill, vllm_pd.decode, vllm_pd.model
    # Reference: a single instance (the prefill one, so D has never seen the prompt).
    single = _completion(p_srv.url, model, LONG_A)
    before = d_srv.metrics_text()
    out = _completion(
        sidecars["local"].url, model, LONG_A, {"x-prefiller-host-port": p_srv.host_port}
    )
    after = d_srv.metrics_text()

    assert _tokens(out) == _tokens(single)
    assert out["usage"]["completion_tokens"] == single["usage"]["completion_tokens"] == N_TOKENS
    prompt_tokens = out["usage"]["prompt_tokens"]
    assert prompt_tokens > 3 * 128
    # Decode pulled the prompt's KV over NIXL instead of computing it.
    ext = metric(
        after, "vllm:prompt_tokens_by_source_total", source="external_kv_transfer"
    ) - metric(before, "vllm:prompt_tokens_by_source_total", source="external_kv_transfer")
    local = metric(after, "vllm:prompt_tokens_by_source_total", source="local_compute") - metric(
        before, "vllm:prompt_tokens_by_source_total", source="local_compute"
    )
    assert ext >= prompt_tokens - 128, (ext, local, prompt_tokens)
    assert local < 128
    assert metric(after, "vllm:nixl_bytes_transferred_sum") > metric(
        before, "vllm:nixl_bytes_transferred_sum"
    )
    # cached_tokens is the prefiller's prefix-cache hit (it served the reference request).
    cached = out["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached > 0 and cached % 128 == 0 and cached <= prompt_tokens
    sm = sidecars["local"].metrics()
    assert metric(sm, "pdroute_sidecar_requests_total", mode="pd", code="200") >= 1


def test_pd_streaming_chat_equals_single_instance(
    vllm_pd: PdPair, sidecars: dict[str, SidecarProc]
) -> None:
    p_srv, d_srv, model = vllm_pd.prefill, vllm_pd.decode, vllm_pd.model
    messages = [{"role": "user", "content": LONG_B}]
    single = post_json(
        f"{p_srv.url}/v1/chat/completions",
        {"model": model, "messages": messages, "max_tokens": N_TOKENS, "temperature": 0},
    )
    before = d_srv.metrics_text()
    body = {
        "model": model,
        "messages": messages,
        "max_tokens": N_TOKENS,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    status, raw = http(
        "POST",
        f"{sidecars['local'].url}/v1/chat/completions",
        body,
        {"x-prefiller-host-port": p_srv.host_port},
    )
    assert status == 200, raw[:300]
    events = [ln[6:] for ln in raw.split(b"\n") if ln.startswith(b"data: ")]
    assert events[-1] == b"[DONE]"
    chunks = [orjson.loads(e) for e in events[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == single["choices"][0]["message"]["content"]
    usage = chunks[-1]["usage"]
    assert usage["prompt_tokens_details"]["cached_tokens"] % 128 == 0
    after = d_srv.metrics_text()
    assert metric(
        after, "vllm:prompt_tokens_by_source_total", source="external_kv_transfer"
    ) > metric(before, "vllm:prompt_tokens_by_source_total", source="external_kv_transfer")


def test_no_header_decodes_locally(vllm_pd: PdPair, sidecars: dict[str, SidecarProc]) -> None:
    d_srv, model = vllm_pd.decode, vllm_pd.model
    before = d_srv.metrics_text()
    out = _completion(sidecars["local"].url, model, SHORT)
    after = d_srv.metrics_text()
    assert out["usage"]["completion_tokens"] == N_TOKENS
    assert metric(
        after, "vllm:prompt_tokens_by_source_total", source="external_kv_transfer"
    ) == metric(before, "vllm:prompt_tokens_by_source_total", source="external_kv_transfer")
    assert metric(after, "vllm:prompt_tokens_by_source_total", source="local_compute") > metric(
        before, "vllm:prompt_tokens_by_source_total", source="local_compute"
    )


def test_dead_prefiller_follows_failure_policy(
    vllm_pd: PdPair, sidecars: dict[str, SidecarProc]
) -> None:
    p_srv, model = vllm_pd.prefill, vllm_pd.model
    dead = sidecars["local"].dead_prefiller  # type: ignore[attr-defined]
    single = _completion(p_srv.url, model, LONG_C)
    # local (default): the client still gets the right answer, decoded locally.
    out = _completion(sidecars["local"].url, model, LONG_C, {"x-prefiller-host-port": dead})
    assert _tokens(out) == _tokens(single)
    sm = sidecars["local"].metrics()
    assert metric(sm, "pdroute_sidecar_prefill_fallbacks_total", reason="connect") >= 1
    # error: a clear JSON error naming the prefiller.
    status, raw = http(
        "POST",
        f"{sidecars['error'].url}/v1/completions",
        {"model": model, "prompt": LONG_C, "max_tokens": 4},
        {"x-prefiller-host-port": dead},
    )
    assert status == 502
    err = orjson.loads(raw)["error"]
    assert err["type"] == "prefill_failed" and err["prefiller"] == dead


def test_ssrf_refuses_non_member(vllm_pd: PdPair, sidecars: dict[str, SidecarProc]) -> None:
    # The decode vLLM itself is not in the pool file: refused before any request.
    status, raw = http(
        "POST",
        f"{sidecars['local'].url}/v1/completions",
        {"model": vllm_pd.model, "prompt": SHORT, "max_tokens": 2},
        {"x-prefiller-host-port": vllm_pd.decode.host_port},
    )
    assert status == 403
    assert "SSRF" in orjson.loads(raw)["error"]["message"]
