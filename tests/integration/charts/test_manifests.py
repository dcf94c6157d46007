"""gateway-manifests/ and e2e/: strict kubeconform, wiring to the chart, ShellCheck.

Every manifest e2e/kind-up.sh applies (or that docs/kubernetes.md tells users to apply)
is validated against the CRDs of the versions the files say they target, and the names
they reference must be the ones `helm install pdroute charts/pdroute` creates.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml
from chart_helpers import (
    CHART,
    E2E,
    GATEWAY_MANIFESTS,
    REPO_ROOT,
    Doc,
    Validator,
    container,
    find,
    helm_template,
    load_docs,
    one,
)

from pdroute.cli import build_parser

MANIFESTS = sorted(
    p
    for p in [*GATEWAY_MANIFESTS.rglob("*.yaml"), *(E2E / "manifests").glob("*.yaml")]
    if not p.name.endswith("-values.yaml")  # Helm values for third-party charts
)
VARIANTS = ["envoy-gateway", "envoy-gateway-patch", "kgateway", "istio"]


def _docs(path: Path) -> list[Doc]:
    return load_docs(path.read_text())


def test_every_variant_has_manifests() -> None:
    for variant in [*VARIANTS, "multi-model"]:
        assert list((GATEWAY_MANIFESTS / variant).glob("*.yaml")), variant
    assert (GATEWAY_MANIFESTS / "README.md").exists()


@pytest.mark.parametrize("path", MANIFESTS, ids=[str(p.relative_to(REPO_ROOT)) for p in MANIFESTS])
def test_manifest_passes_strict_kubeconform(validate: Validator, path: Path) -> None:
    text = path.read_text()
    result = validate(text)
    assert result.problems() == []
    assert len(result.resources) == len(load_docs(text)) > 0


@pytest.fixture(scope="module")
def chart_docs(helm: str) -> list[Doc]:
    return load_docs(helm_template(helm, "-f", str(CHART / "examples" / "pd.yaml")))


@pytest.mark.parametrize("variant", VARIANTS)
def test_routes_point_at_the_charts_pool(variant: str, chart_docs: list[Doc]) -> None:
    pool = one(chart_docs, "InferencePool")["metadata"]["name"]
    docs = [d for p in (GATEWAY_MANIFESTS / variant).glob("*.yaml") for d in _docs(p)]
    gateways = {g["metadata"]["name"] for g in find(docs, "Gateway")}
    routes = find(docs, "HTTPRoute")
    assert routes
    for route in routes:
        assert {p["name"] for p in route["spec"]["parentRefs"]} <= gateways
        refs = [b for rule in route["spec"]["rules"] for b in rule["backendRefs"]]
        pool_refs = [b for b in refs if b.get("kind") == "InferencePool"]
        if variant == "envoy-gateway-patch":
            # Routed through a Service whose selector is the pool's selector.
            svc = one(docs, "Service", refs[0]["name"])
            selector = one(chart_docs, "InferencePool")["spec"]["selector"]["matchLabels"]
            assert svc["spec"]["selector"] == selector
            assert svc["spec"]["ports"][0]["targetPort"] == 8000
        else:
            assert pool_refs and all(
                b["group"] == "inference.networking.k8s.io" and b["name"] == pool for b in pool_refs
            )


def test_epp_references_match_the_charts_service(chart_docs: list[Doc]) -> None:
    pool = one(chart_docs, "InferencePool")["spec"]["endpointPickerRef"]
    epp, port = pool["name"], pool["port"]["number"]
    istio = [d for p in (GATEWAY_MANIFESTS / "istio").glob("*.yaml") for d in _docs(p)]
    rule = one(istio, "DestinationRule")
    assert rule["spec"]["host"] == f"{epp}.default.svc.cluster.local"
    assert rule["spec"]["trafficPolicy"]["tls"]["mode"] == "SIMPLE"
    patch = [
        d for p in (GATEWAY_MANIFESTS / "envoy-gateway-patch").glob("*.yaml") for d in _docs(p)
    ]
    backend = one(patch, "Backend")
    assert backend["spec"]["endpoints"][0]["fqdn"] == {
        "hostname": f"{epp}.default.svc.cluster.local",
        "port": port,
    }
    assert backend["spec"]["tls"]["insecureSkipVerify"] is True  # the EPP's self-signed cert
    policy = one(patch, "EnvoyExtensionPolicy")["spec"]["extProc"][0]
    assert policy["backendRefs"][0]["name"] == backend["metadata"]["name"]
    assert policy["processingMode"]["request"]["body"] == "FullDuplexStreamed"


def test_patch_policy_routes_on_the_epp_header() -> None:
    from pdroute.protocol.headers import DESTINATION_ENDPOINT

    docs = [d for p in (GATEWAY_MANIFESTS / "envoy-gateway-patch").glob("*.yaml") for d in _docs(p)]
    patches = one(docs, "EnvoyPatchPolicy")["spec"]["jsonPatches"]
    cluster = next(p for p in patches if p["type"].endswith("Cluster"))["operation"]["value"]
    assert cluster["type"] == "ORIGINAL_DST"
    header = cluster["original_dst_lb_config"]["http_header_name"]
    assert header == DESTINATION_ENDPOINT
    route = next(p for p in patches if p["type"].endswith("RouteConfiguration"))
    gw = one(docs, "Gateway")
    assert route["name"] == f"default/{gw['metadata']['name']}/{gw['spec']['listeners'][0]['name']}"
    assert route["operation"]["value"] == cluster["name"]


def test_envoy_gateway_values_delegate_inferencepools(crd_sources: Path) -> None:
    values = yaml.safe_load((GATEWAY_MANIFESTS / "envoy-gateway" / "eg-values.yaml").read_text())
    manager = values["config"]["envoyGateway"]["extensionManager"]
    (res,) = manager["backendResources"]
    assert (res["group"], res["kind"]) == ("inference.networking.k8s.io", "InferencePool")
    # ... at a version the InferencePool CRD actually serves.
    crd_file = next(
        crd_sources.glob("inferencepool-*/inference.networking.k8s.io_inferencepools.yaml")
    )
    crd = yaml.safe_load(crd_file.read_text())
    served = {v["name"] for v in crd["spec"]["versions"] if v.get("served")}
    assert res["version"] in served


def test_multi_model_routes_on_the_bbr_header() -> None:
    from epp.bbr import MODEL_HEADER

    docs = _docs(GATEWAY_MANIFESTS / "multi-model" / "multi-model.yaml")
    bbr = container(one(docs, "Deployment")["spec"]["template"]["spec"], "bbr")
    argv = [*bbr["command"][1:], *bbr["args"]]
    args = build_parser(argv).parse_args(argv)
    svc = one(docs, "Service", "pdroute-bbr")
    assert svc["spec"]["ports"][0]["port"] == args.port
    assert args.header_name == MODEL_HEADER
    policy = one(docs, "EnvoyExtensionPolicy")["spec"]
    assert policy["targetRefs"][0]["kind"] == "Gateway"  # BBR must run before route choice
    route = one(docs, "HTTPRoute")
    models = {}
    for rule in route["spec"]["rules"]:
        (match,) = rule["matches"]
        (hdr,) = match["headers"]
        assert hdr["name"] == MODEL_HEADER
        (ref,) = rule["backendRefs"]
        assert ref["kind"] == "InferencePool"
        models[hdr["value"]] = ref["name"]
    assert len(set(models.values())) == len(models) >= 2


def test_kind_up_applies_only_validated_files() -> None:
    """Every repository file kind-up.sh applies is covered by the kubeconform tests."""
    script = (E2E / "kind-up.sh").read_text()
    applied = re.findall(r'-f "\$ROOT/([^"]+\.yaml)"', script)
    covered = {str(p.relative_to(REPO_ROOT)) for p in MANIFESTS}
    values = {"gateway-manifests/envoy-gateway/eg-values.yaml"}
    assert applied
    for rel in applied:
        assert rel in covered or rel in values, rel
        assert (REPO_ROOT / rel).exists(), rel


# --- ShellCheck -------------------------------------------------------------------------

SCRIPTS = sorted(
    [
        *E2E.glob("*.sh"),
        *(REPO_ROOT / "scripts").glob("*"),
        *(REPO_ROOT / "scripts" / "bootstrap.d").glob("*.sh"),
    ]
)
SCRIPTS = [p for p in SCRIPTS if p.is_file() and not p.name.endswith((".py", ".md"))]


@pytest.mark.parametrize("path", SCRIPTS, ids=[str(p.relative_to(REPO_ROOT)) for p in SCRIPTS])
def test_shellcheck(shellcheck: str, path: Path) -> None:
    # bootstrap.d fragments and lib.sh are sourced by bash scripts that run under
    # `set -euo pipefail`: check them as bash; a failing `cd` aborts anyway (SC2164),
    # variables they set are read by the sourcing script (SC2034), and pip extras such
    # as "$REPO_ROOT[dev]" are not array expansions (SC1087).
    mine = path.is_relative_to(E2E) or path.name == "55-helm.sh"
    cmd = [shellcheck, "--shell=bash", "--external-sources", "--source-path=SCRIPTDIR"]
    if not mine:
        cmd += ["--severity=warning", "--exclude=SC2034,SC2164,SC1087"]
    r = subprocess.run([*cmd, str(path)], capture_output=True, text=True, check=False, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
