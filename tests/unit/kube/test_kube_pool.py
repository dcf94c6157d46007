"""InferencePool v1 resolution rules (pure functions)."""

from __future__ import annotations

import msgspec
import pytest

from pdroute.kube.pool import (
    InvalidPool,
    PoolTarget,
    format_selector,
    host_port,
    parse_ports,
    parse_selector,
    pod_endpoints,
    pod_ready,
    pool_target,
    resolve,
)
from pdroute.kube.types import InferencePool, Pod


def pod(
    name: str,
    ip: str = "10.0.0.1",
    *,
    labels: dict[str, str] | None = None,
    ready: str = "True",
    deleting: bool = False,
    annotations: dict[str, str] | None = None,
) -> Pod:
    doc = {
        "metadata": {
            "name": name,
            "namespace": "ns",
            "labels": {"app": "m"} if labels is None else labels,
            "annotations": annotations or {},
            **({"deletionTimestamp": "2026-01-01T00:00:00Z"} if deleting else {}),
        },
        "status": {"podIP": ip, "conditions": [{"type": "Ready", "status": ready}]},
    }
    return msgspec.json.decode(msgspec.json.encode(doc), type=Pod)


TARGET = PoolTarget({"app": "m"}, (8000, 8001))


def test_ready_requires_ip_condition_and_no_deletion() -> None:
    assert pod_ready(pod("a"))
    assert not pod_ready(pod("a", ready="False"))
    assert not pod_ready(pod("a", ip=""))
    assert not pod_ready(pod("a", deleting=True))


def test_one_endpoint_per_target_port_named_by_rank() -> None:
    eps = pod_endpoints(pod("vllm-0", labels={"app": "m", "llm-d.ai/role": "decode"}), TARGET)
    assert [(e.name, e.host_port) for e in eps] == [
        ("vllm-0-rank-0", "10.0.0.1:8000"),
        ("vllm-0-rank-1", "10.0.0.1:8001"),
    ]
    assert eps[0].labels["llm-d.ai/role"] == "decode"


def test_selector_must_match_all_labels() -> None:
    assert pod_endpoints(pod("x", labels={"app": "other"}), TARGET) == []
    t = PoolTarget({"app": "m", "tier": "a"}, (8000,))
    assert pod_endpoints(pod("x", labels={"app": "m"}), t) == []
    assert len(pod_endpoints(pod("x", labels={"app": "m", "tier": "a"}), t)) == 1


def test_active_ports_annotation_narrows_and_keeps_rank() -> None:
    p = pod("v", annotations={"inference.networking.k8s.io/active-ports": "8001, junk"})
    eps = pod_endpoints(p, TARGET)
    assert [(e.name, e.port) for e in eps] == [("v-rank-1", 8001)]
    empty = pod("v", annotations={"inference.networking.k8s.io/active-ports": ""})
    assert pod_endpoints(empty, TARGET) == []


def test_resolve_sorted_and_deduplicated_by_host_port() -> None:
    pods = [pod("b", "10.0.0.2"), pod("a", "10.0.0.1"), pod("c", "10.0.0.1")]
    eps = resolve(pods, PoolTarget({"app": "m"}, (8000,)))
    assert [e.name for e in eps] == ["a-rank-0", "b-rank-0"]


def test_ipv6_host_port_is_bracketed() -> None:
    assert host_port("fd00::1", 8000) == "[fd00::1]:8000"
    assert host_port("10.0.0.1", 80) == "10.0.0.1:80"


def test_pool_target_from_v1_object() -> None:
    raw = {
        "metadata": {"name": "p", "namespace": "ns"},
        "spec": {
            "selector": {"matchLabels": {"app": "m"}},
            "targetPorts": [{"number": 8000}, {"number": 8002}],
            "endpointPickerRef": {"name": "epp", "port": {"number": 9002}},
        },
    }
    pool = msgspec.json.decode(msgspec.json.encode(raw), type=InferencePool)
    t = pool_target(pool)
    assert dict(t.selector) == {"app": "m"} and t.target_ports == (8000, 8002)
    raw["spec"]["selector"] = {"matchExpressions": [{"key": "a", "operator": "Exists"}]}  # type: ignore[index]
    bad = msgspec.json.decode(msgspec.json.encode(raw), type=InferencePool)
    with pytest.raises(InvalidPool, match="matchExpressions"):
        pool_target(bad)


@pytest.mark.parametrize(
    ("selector", "ports", "match"),
    [
        ({}, (8000,), "at least one label"),
        ({"a": "b"}, (), "1 to 8"),
        ({"a": "b"}, tuple(range(8000, 8009)), "1 to 8"),
        ({"a": "b"}, (8000, 8000), "duplicates"),
        ({"a": "b"}, (0,), "1..65535"),
    ],
)
def test_target_validation(selector: dict[str, str], ports: tuple[int, ...], match: str) -> None:
    with pytest.raises(InvalidPool, match=match):
        PoolTarget(selector, ports)


def test_selector_and_ports_flags() -> None:
    assert parse_selector("app=m, tier=a") == {"app": "m", "tier": "a"}
    assert format_selector({"tier": "a", "app": "m"}) == "app=m,tier=a"
    for bad in ("app", "app!=m", "=m", "a=b,a=c", ""):
        with pytest.raises(InvalidPool):
            parse_selector(bad)
    assert parse_ports("8000, 8001") == (8000, 8001)
    with pytest.raises(InvalidPool, match="not an integer"):
        parse_ports("80x")
