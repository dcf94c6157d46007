"""charts/pdroute: helm lint/template, strict kubeconform, and wiring checks.

Rendered objects are checked against what the running programs accept: container args
are parsed by the real ``pdroute`` CLI parsers, the EPP ConfigMap is built by the real
config loader, and every metric the dashboard / autoscalers query is looked up in the
EPP's metrics registry. A chart that drifts from the code fails here.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from chart_helpers import (
    CHART,
    EXAMPLES,
    RELEASE,
    Doc,
    HelmError,
    Validator,
    container,
    find,
    helm_template,
    load_docs,
    one,
)

from epp.config import DEFAULT_CONFIG_PATH
from pdroute.cli import build_parser

VALUE_SETS: list[tuple[str, list[str]]] = [("defaults", [])] + [
    (p.stem, ["-f", str(p)]) for p in EXAMPLES
]
IDS = [name for name, _ in VALUE_SETS]
EPP = f"{RELEASE}-epp"


def parse_cli(command: list[str], args: list[str]) -> argparse.Namespace:
    """Parse a container's command + args with the real ``pdroute`` parser."""
    assert command[0] == "pdroute", command
    argv = [*command[1:], *args]
    return build_parser(argv).parse_args(argv)


def render(helm: str, *args: str) -> list[Doc]:
    return load_docs(helm_template(helm, *args))


def pod_spec(deploy: Doc) -> Doc:
    spec: Doc = deploy["spec"]["template"]["spec"]
    return spec


def test_examples_exist() -> None:
    assert {p.stem for p in EXAMPLES} >= {"aggregated", "pd", "simulator"}


@pytest.mark.parametrize(("name", "args"), VALUE_SETS, ids=IDS)
def test_helm_lint_strict(helm: str, name: str, args: list[str]) -> None:
    r = subprocess.run(
        [helm, "lint", "--strict", str(CHART), *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 chart(s) failed" in r.stdout


@pytest.mark.parametrize(("name", "args"), VALUE_SETS, ids=IDS)
def test_rendered_chart_passes_strict_kubeconform(
    helm: str, validate: Validator, name: str, args: list[str]
) -> None:
    text = helm_template(helm, *args)
    result = validate(text)
    assert result.problems() == []
    assert len(result.resources) == len(load_docs(text)) >= 7


def test_kubeconform_schemas_are_strict(validate: Validator) -> None:
    """The validator must reject a misspelled field, a bad enum and a bad InferencePool."""
    bad = """
apiVersion: apps/v1
kind: Deployment
metadata: {name: x}
spec:
  replica: 1
  selector: {matchLabels: {a: b}}
  template:
    metadata: {labels: {a: b}}
    spec: {containers: [{name: c, image: i}]}
---
apiVersion: inference.networking.k8s.io/v1
kind: InferencePool
metadata: {name: p}
spec:
  selector: {matchLabels: {a: b}}
  targetPorts: [{number: 8000}]
  endpointPickerRef: {name: e, port: {number: 9002}, failureMode: Sometimes}
"""
    problems = validate(bad).problems()
    assert len(problems) == 2
    assert any("replica" in p for p in problems)
    assert any("failureMode" in p for p in problems)


def test_expected_objects_per_example(helm: str) -> None:
    kinds = {name: sorted({d["kind"] for d in render(helm, *args)}) for name, args in VALUE_SETS}
    base = {"ConfigMap", "Deployment", "InferencePool", "Role", "RoleBinding", "Service"}
    assert base <= set(kinds["defaults"])
    assert "HorizontalPodAutoscaler" in kinds["aggregated"]
    assert {"ScaledObject", "PodDisruptionBudget", "ServiceMonitor", "PodMonitor"} <= set(
        kinds["pd"]
    )


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("epp.replica=2", "replica"),
        ("epp.tls.mode=plain", "mode"),
        ("pool.failureMode=Sometimes", "failureMode"),
        ("modelServers.prefill.tensorParallelSize=0", "tensorParallelSize"),
    ],
)
def test_values_schema_rejects_bad_values(helm: str, override: str, needle: str) -> None:
    with pytest.raises(HelmError, match=needle):
        helm_template(helm, "--set", override)


def test_tls_secret_mode_needs_a_secret_name(helm: str) -> None:
    with pytest.raises(HelmError, match=r"epp\.tls\.secretName"):
        helm_template(helm, "--set", "epp.tls.mode=secret")
    docs = render(helm, "--set", "epp.tls.mode=secret", "--set", "epp.tls.secretName=epp-tls")
    spec = pod_spec(one(docs, "Deployment", EPP))
    args = parse_cli(container(spec, "epp")["command"], container(spec, "epp")["args"])
    assert args.secure_serving is True
    assert str(args.cert_path) == "/certs"
    vols = {v["name"]: v for v in spec["volumes"]}
    assert vols["certs"]["secret"]["secretName"] == "epp-tls"


@pytest.mark.parametrize(("name", "args"), VALUE_SETS, ids=IDS)
def test_epp_args_parse_with_the_real_cli(helm: str, name: str, args: list[str]) -> None:
    docs = render(helm, *args)
    deploy = one(docs, "Deployment", EPP)
    epp = container(pod_spec(deploy), "epp")
    parsed = parse_cli(epp["command"], epp["args"])
    pool = one(docs, "InferencePool")
    assert parsed.pool_name == pool["metadata"]["name"]
    assert parsed.pool_namespace == "default"
    assert parsed.secure_serving is True
    ports = {p["name"]: p["containerPort"] for p in epp["ports"]}
    assert ports == {
        "grpc": parsed.grpc_port,
        "grpc-health": parsed.grpc_health_port,
        "metrics": parsed.metrics_port,
    }
    # The config file is the mounted ConfigMap's key.
    mount = next(m for m in epp["volumeMounts"] if m["name"] == "config")
    cm_key = Path(parsed.config_file).relative_to(mount["mountPath"]).as_posix()
    assert cm_key in one(docs, "ConfigMap", EPP)["data"]
    # HA: leader election iff more than one replica, with Lease RBAC to match.
    ha = deploy["spec"]["replicas"] > 1
    assert parsed.ha_enable_leader_election is ha
    role = one(docs, "Role", EPP)
    lease_rules = [r for r in role["rules"] if "leases" in r["resources"]]
    assert bool(lease_rules) is ha
    assert deploy["spec"]["strategy"]["type"] == "Recreate"
    for probe, service in (("livenessProbe", "liveness"), ("readinessProbe", "readiness")):
        assert epp[probe]["grpc"] == {"port": parsed.grpc_health_port, "service": service}


def test_leader_election_switch(helm: str) -> None:
    def ha(*args: str) -> bool:
        docs = render(helm, *args)
        epp = container(pod_spec(one(docs, "Deployment", EPP)), "epp")
        return bool(parse_cli(epp["command"], epp["args"]).ha_enable_leader_election)

    assert ha() is False
    assert ha("--set", "epp.replicas=2") is True
    assert ha("--set", "epp.replicas=2", "--set", "epp.leaderElection=disabled") is False
    assert ha("--set", "epp.leaderElection=enabled") is True


def test_epp_verbosity_and_plaintext(helm: str) -> None:
    docs = render(helm, "--set", "epp.verbosity=2", "--set", "epp.tls.mode=disabled")
    epp = container(pod_spec(one(docs, "Deployment", EPP)), "epp")
    parsed = parse_cli(epp["command"], epp["args"])
    assert parsed.verbose == 2
    assert parsed.secure_serving is False


def _epp_config(docs: list[Doc]) -> str:
    text: str = one(docs, "ConfigMap", EPP)["data"]["epp-config.yaml"]
    return text


@pytest.mark.parametrize(
    ("preset", "handler"), [("default", "single-profile-handler"), ("pd", "disagg-profile-handler")]
)
def test_epp_config_builds_with_the_real_loader(helm: str, preset: str, handler: str) -> None:
    from epp.datastore import Datastore
    from epp.requestcontrol import build_director

    docs = render(helm, "--set", f"epp.config.preset={preset}")
    director = build_director(Datastore(staleness_s=2.0), config_text=_epp_config(docs))
    assert director.config.profile_handler == handler
    # Every profile scores with the EPP's built-in default scorers and weights.
    default = yaml.safe_load(DEFAULT_CONFIG_PATH.read_text())
    want = {
        p["pluginRef"]: p["weight"]
        for p in default["schedulingProfiles"][0]["plugins"]
        if "weight" in p
    }
    profiles = yaml.safe_load(_epp_config(docs))["schedulingProfiles"]
    assert len(profiles) == (1 if preset == "default" else 2)
    for prof in profiles:
        got = {p["pluginRef"]: p["weight"] for p in prof["plugins"] if "weight" in p}
        assert got == want, prof["name"]


def test_default_preset_ships_the_epps_default_config_file() -> None:
    shipped = CHART / "files" / "epp-default-config.yaml"
    assert shipped.read_bytes() == DEFAULT_CONFIG_PATH.read_bytes(), (
        "charts/pdroute/files/epp-default-config.yaml must be a copy of "
        "epp/config/default-config.yaml"
    )


def test_pd_threshold_and_custom_config(helm: str) -> None:
    from epp.datastore import Datastore
    from epp.requestcontrol import build_director

    docs = render(helm, "--set", "epp.config.preset=pd", "--set", "epp.config.pdNonCachedTokens=64")
    cfg = yaml.safe_load(_epp_config(docs))
    decider = next(p for p in cfg["plugins"] if p["type"] == "prefix-based-pd-decider")
    assert decider["parameters"]["nonCachedTokens"] == 64

    custom = "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\nplugins:\n- type: random-picker\n"
    docs = render(helm, "--set-string", f"epp.config.custom={custom}")
    text = _epp_config(docs)
    assert yaml.safe_load(text) == yaml.safe_load(custom)
    build_director(Datastore(staleness_s=2.0), config_text=text)


@pytest.mark.parametrize(("name", "args"), VALUE_SETS, ids=IDS)
def test_pool_service_and_model_servers_are_wired(helm: str, name: str, args: list[str]) -> None:
    docs = render(helm, *args)
    pool = one(docs, "InferencePool")["spec"]
    svc = one(docs, "Service", EPP)
    ref = pool["endpointPickerRef"]
    assert (ref["kind"], ref["name"]) == ("Service", EPP)
    grpc = next(p for p in svc["spec"]["ports"] if p["port"] == ref["port"]["number"])
    assert grpc["appProtocol"] == "http2"
    epp_labels = one(docs, "Deployment", EPP)["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= epp_labels.items()

    selector = pool["selector"]["matchLabels"]
    target = pool["targetPorts"][0]["number"]
    servers = [d for d in find(docs, "Deployment") if d["metadata"]["name"] != EPP]
    for d in servers:
        labels = d["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= labels.items(), d["metadata"]["name"]
        assert d["spec"]["selector"]["matchLabels"].items() <= labels.items()
        # Something in every pool pod listens on the pool's target port.
        spec = pod_spec(d)
        ports = {
            p["containerPort"]
            for c in [*spec.get("initContainers", []), *spec["containers"]]
            for p in c.get("ports", [])
        }
        assert target in ports, d["metadata"]["name"]
    # Only model servers carry the pool labels: the EPP is not a pool member.
    assert not selector.items() <= epp_labels.items()


def _model_server(docs: list[Doc], role: str) -> Doc:
    return one(docs, "Deployment", f"{RELEASE}-{role}")


def test_pd_decode_pods_run_the_sidecar_in_front_of_vllm(helm: str) -> None:
    docs = render(helm, "-f", str(CHART / "examples" / "pd.yaml"))
    pool = one(docs, "InferencePool")["spec"]
    decode = _model_server(docs, "decode")
    spec = pod_spec(decode)
    sidecar = container(spec, "sidecar")
    assert sidecar in spec["initContainers"]
    assert sidecar["restartPolicy"] == "Always"  # native sidecar
    sc = parse_cli(sidecar["command"], sidecar["args"])
    assert sc.port == pool["targetPorts"][0]["number"] == 8000
    assert sc.inference_pool == f"default/{one(docs, 'InferencePool')['metadata']['name']}"
    vllm = container(spec, "vllm")
    vllm_port = next(p["containerPort"] for p in vllm["ports"] if p["name"] == "http")
    assert sc.model_server_port == vllm_port == 8200
    assert f"--port={vllm_port}" in vllm["args"]
    assert spec["automountServiceAccountToken"] is True  # the sidecar watches the pool

    prefill = pod_spec(_model_server(docs, "prefill"))
    assert "initContainers" not in prefill
    assert prefill["automountServiceAccountToken"] is False
    for s, role in ((spec, "decode"), (prefill, "prefill")):
        v = container(s, "vllm")
        env = {e["name"]: e for e in v["env"]}
        assert env["VLLM_NIXL_SIDE_CHANNEL_HOST"]["valueFrom"]["fieldRef"]["fieldPath"] == (
            "status.podIP"
        )
        assert any(p["containerPort"] == 5600 for p in v["ports"])
        kv = next(a for a in v["args"] if a.startswith("--kv-transfer-config="))
        assert json.loads(kv.split("=", 1)[1])["kv_connector"] == "NixlConnector"
        assert "--tensor-parallel-size=" + ("2" if role == "decode" else "1") in v["args"]
        shm = next(m for m in v["volumeMounts"] if m["mountPath"] == "/dev/shm")
        assert {x["name"]: x for x in s["volumes"]}[shm["name"]]["emptyDir"]["medium"] == "Memory"
    labels = {
        role: _model_server(docs, role)["spec"]["template"]["metadata"]["labels"]["llm-d.ai/role"]
        for role in ("prefill", "decode")
    }
    assert labels == {"prefill": "prefill", "decode": "decode"}


def test_expert_and_data_parallel_flags(helm: str) -> None:
    docs = render(
        helm,
        "--set",
        "modelServers.enabled=true",
        "--set",
        "modelServers.decode.dataParallelSize=4",
        "--set",
        "modelServers.decode.enableExpertParallel=true",
    )
    args = container(pod_spec(_model_server(docs, "decode")), "vllm")["args"]
    assert "--data-parallel-size=4" in args
    assert "--enable-expert-parallel" in args
    prefill = container(pod_spec(_model_server(docs, "prefill")), "vllm")["args"]
    assert "--enable-expert-parallel" not in prefill


def test_aggregated_has_no_sidecar_and_no_kv_transfer(helm: str) -> None:
    docs = render(helm, "-f", str(CHART / "examples" / "aggregated.yaml"))
    assert not find(docs, "Deployment", f"{RELEASE}-prefill")
    spec = pod_spec(_model_server(docs, "decode"))
    assert "initContainers" not in spec
    vllm = container(spec, "vllm")
    assert "--port=8000" in vllm["args"]
    assert not any(a.startswith("--kv-transfer-config") for a in vllm["args"])


def test_simulator_pods_run_pdroute_sim(helm: str) -> None:
    docs = render(helm, "-f", str(CHART / "examples" / "simulator.yaml"))
    for role, port in (("prefill", 8000), ("decode", 8200)):
        spec = pod_spec(_model_server(docs, role))
        sim = container(spec, "sim")
        parsed = parse_cli(sim["command"], sim["args"])
        assert parsed.role == role
        assert parsed.port == port
        assert parsed.host == "0.0.0.0"
        labels = _model_server(docs, role)["spec"]["template"]["metadata"]["labels"]
        assert labels["llm-d.ai/role"] == role
        assert sim["image"] == container(spec, "sim")["image"]
    decode = pod_spec(_model_server(docs, "decode"))
    sc = parse_cli(container(decode, "sidecar")["command"], container(decode, "sidecar")["args"])
    assert sc.model_server_port == 8200


def test_containers_run_restricted(helm: str) -> None:
    docs = render(helm, "-f", str(CHART / "examples" / "simulator.yaml"))
    for d in find(docs, "Deployment"):
        spec = pod_spec(d)
        for c in [*spec.get("initContainers", []), *spec["containers"]]:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, c["name"]
            assert sc["readOnlyRootFilesystem"] is True, c["name"]
            assert sc["capabilities"]["drop"] == ["ALL"], c["name"]
    role = one(docs, "Role", EPP)
    verbs = {
        (g, r): set(rule["verbs"])
        for rule in role["rules"]
        for g in rule["apiGroups"]
        for r in rule["resources"]
    }
    assert verbs[("", "pods")] == {"get", "list", "watch"}
    assert verbs[("inference.networking.k8s.io", "inferencepools")] == {"get", "list", "watch"}
    assert not any(k[1] in ("secrets", "configmaps") for k in verbs)


# --- metrics: dashboard and autoscalers query series the EPP exports ----------------

_METRIC = re.compile(r"\b(llm_d_epp_[a-z0-9_]+)")
_SUFFIXES = ("_bucket", "_count", "_sum", "_total", "_created")


def _exported_series() -> set[str]:
    from epp.metrics import REGISTRY

    names: set[str] = set()
    for metric in REGISTRY.collect():
        names.add(metric.name)
        for sample in metric.samples:
            names.add(sample.name)
        if metric.type == "counter":
            names.add(metric.name + "_total")
        if metric.type == "histogram":
            names.update(metric.name + s for s in ("_bucket", "_count", "_sum"))
    return names


def _referenced(text: str) -> set[str]:
    return set(_METRIC.findall(text))


def test_dashboard_queries_exported_metrics(helm: str) -> None:
    docs = render(helm, "--set", "monitoring.dashboard.enabled=true")
    cm = one(docs, "ConfigMap", f"{RELEASE}-dashboard")
    dashboard: dict[str, Any] = json.loads(cm["data"]["pdroute-epp.json"])
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    referenced = set().union(*(_referenced(e) for e in exprs))
    assert referenced, "dashboard queries no EPP metric"
    assert referenced - _exported_series() == set()
    titles = " ".join(p["title"] for p in dashboard["panels"]).lower()
    for needle in ("request rate", "errors", "scheduler latency", "queue", "kv-cache"):
        assert needle in titles
    scheduler = next(p for p in dashboard["panels"] if p["title"] == "Scheduler latency")
    assert {t["legendFormat"] for t in scheduler["targets"]} == {"p50", "p99"}


def test_autoscalers_use_exported_per_role_signals(helm: str) -> None:
    hpa_docs = render(
        helm,
        "--set",
        "modelServers.enabled=true",
        "--set",
        "modelServers.prefill.autoscaling.enabled=true",
        "--set",
        "modelServers.decode.autoscaling.enabled=true",
    )
    signals = {
        d["spec"]["scaleTargetRef"]["name"]: d["spec"]["metrics"][0]["external"]["metric"]
        for d in find(hpa_docs, "HorizontalPodAutoscaler")
    }
    assert signals[f"{RELEASE}-prefill"]["name"] == "llm_d_epp_pool_average_queue_size"
    assert signals[f"{RELEASE}-prefill"]["selector"]["matchLabels"]["role"] == "prefill"
    assert signals[f"{RELEASE}-decode"]["name"] == "llm_d_epp_pool_average_kv_cache_utilization"
    assert signals[f"{RELEASE}-decode"]["selector"]["matchLabels"]["role"] == "decode"
    # Autoscaled Deployments leave replicas to the autoscaler.
    assert "replicas" not in _model_server(hpa_docs, "decode")["spec"]

    keda = render(helm, "-f", str(CHART / "examples" / "pd.yaml"))
    queries = {
        d["spec"]["scaleTargetRef"]["name"]: d["spec"]["triggers"][0]["metadata"]["query"]
        for d in find(keda, "ScaledObject")
    }
    assert 'role="prefill"' in queries[f"{RELEASE}-prefill"]
    assert 'role="decode"' in queries[f"{RELEASE}-decode"]
    referenced = set().union(*(_referenced(q) for q in queries.values()))
    referenced |= {m["name"] for m in signals.values()}
    assert referenced - _exported_series() == set()


@pytest.mark.parametrize("disaggregated", ["true", "false"])
def test_autoscaler_role_matches_the_pods_role_label(helm: str, disaggregated: str) -> None:
    """The EPP labels its per-role gauges with the pods' llm-d.ai/role value."""
    docs = render(
        helm,
        "--set",
        "modelServers.enabled=true",
        "--set",
        f"modelServers.disaggregated={disaggregated}",
        "--set",
        "modelServers.decode.autoscaling.enabled=true",
    )
    (hpa,) = find(docs, "HorizontalPodAutoscaler")
    target = one(docs, "Deployment", hpa["spec"]["scaleTargetRef"]["name"])
    role = target["spec"]["template"]["metadata"]["labels"]["llm-d.ai/role"]
    assert (
        hpa["spec"]["metrics"][0]["external"]["metric"]["selector"]["matchLabels"]["role"] == role
    )
    assert role == ("decode" if disaggregated == "true" else "prefill-decode")
