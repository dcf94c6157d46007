"""The EPP's Kubernetes flags: add_kube_arguments / build_kube_source validation."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from epp.datalayer.kube_source import (
    KubeEndpointSource,
    add_kube_arguments,
    build_kube_source,
    to_endpoint,
)
from pdroute.kube import KubeConfigError, PoolEndpoint


def parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_kube_arguments(p)
    return p.parse_args(list(argv))


def test_no_kube_flags_means_no_source() -> None:
    assert build_kube_source(parse()) is None


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--pool-name", "p", "--endpoint-selector", "a=b"], "mutually exclusive"),
        (["--endpoint-selector", "a=b"], "needs both"),
        (["--endpoint-target-ports", "8000"], "needs both"),
        (["--endpoint-selector", "a", "--endpoint-target-ports", "8000"], "--endpoint-selector"),
        (["--endpoint-selector", "a=b", "--endpoint-target-ports", "8000,8000"], "duplicates"),
        (["--pool-name", "p"], "KUBERNETES_SERVICE_HOST"),
        (
            ["--pool-name", "p", "--kube-api-server", "https://x", "--kube-token-file", "/nope"],
            "--kube-token-file",
        ),
    ],
)
def test_bad_flags_name_the_flag(
    argv: list[str], match: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(KubeConfigError, match=match):
        build_kube_source(parse(*argv))


async def test_builds_standalone_source_with_election(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    token = tmp_path / "token"
    token.write_text("t\n")
    monkeypatch.setenv("NAMESPACE", "llm")
    src = build_kube_source(
        parse(
            "--endpoint-selector",
            "app=m",
            "--endpoint-target-ports",
            "8000,8001",
            "--kube-api-server",
            "http://127.0.0.1:1",
            "--kube-token-file",
            str(token),
            "--ha-enable-leader-election",
            "--ha-identity",
            "me",
        )
    )
    assert isinstance(src, KubeEndpointSource)
    try:
        assert src.watcher.namespace == "llm"
        assert src.watcher.target is not None and src.watcher.target.target_ports == (8000, 8001)
        assert src.elector is not None and src.elector.identity == "me"
        assert not src.ready()  # nothing synced yet
    finally:
        await src.client.close()


def test_bad_election_timings_name_the_flags() -> None:
    with pytest.raises(KubeConfigError, match="--ha-lease-duration"):
        build_kube_source(
            parse(
                "--pool-name",
                "p",
                "--kube-api-server",
                "http://127.0.0.1:1",
                "--ha-enable-leader-election",
                "--ha-lease-duration",
                "5",
                "--ha-renew-deadline",
                "6",
            )
        )


def test_endpoint_conversion() -> None:
    ep = PoolEndpoint(
        pod="vllm-0",
        namespace="ns",
        rank=1,
        address="10.1.2.3",
        port=8001,
        labels={"inference.networking.k8s.io/engine-type": "sglang", "llm-d.ai/role": "prefill"},
    )
    e = to_endpoint(ep)
    assert (e.name, e.key, e.engine, e.role) == (
        "vllm-0-rank-1",
        "10.1.2.3:8001",
        "sglang",
        "prefill",
    )
