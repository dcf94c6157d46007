"""Server-side dry run of the chart and the gateway manifests on a real kube-apiserver.

kubeconform checks the OpenAPI shape; the API server also runs defaulting, CEL
validation rules of the CRDs, built-in validation (label syntax, port names, probes,
RBAC rules, HPA metric specs) and strict field validation. Every object is sent as a
server-side apply with ``dryRun=All&fieldValidation=Strict``, so nothing is stored.

The control plane is the kube tier's (``scripts/kube-apiserver.sh``, built by
``scripts/bootstrap.d/50-kube.sh``); it ships the Gateway API and InferencePool CRDs.
The other CRDs the manifests use (Envoy Gateway, Prometheus Operator, KEDA, Istio) are
installed here from the sources ``scripts/bootstrap.d/55-helm.sh`` downloads.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import yaml
from chart_helpers import (
    EXAMPLES,
    GATEWAY_MANIFESTS,
    REPO_ROOT,
    Doc,
    helm_template,
    load_docs,
)

from tests.kubeapi import CACHE, KubeCluster, private_control_plane
from tests.netutil import free_port

pytestmark = pytest.mark.kube

MANAGER = "pdroute-chart-tests"


@pytest.fixture(scope="module")
def cluster() -> Iterator[KubeCluster]:
    """A private etcd + kube-apiserver for this module (same script as the kube tier)."""
    with private_control_plane("pdroute-charts-kube-") as c:
        yield c


class Api:
    """Minimal admin client: discovery, CRD install and dry-run server-side apply."""

    def __init__(self, cluster: KubeCluster, session: aiohttp.ClientSession) -> None:
        self.url = cluster.url
        self.s = session
        self.h = {"Authorization": f"Bearer {cluster.token}"}
        self._resources: dict[str, dict[str, tuple[str, bool]]] = {}

    async def request(
        self, method: str, path: str, body: Any = None, ctype: str = "application/json"
    ) -> tuple[int, Any]:
        headers = dict(self.h)
        data = None
        if body is not None:
            data = orjson.dumps(body)
            headers["Content-Type"] = ctype
        async with self.s.request(method, self.url + path, data=data, headers=headers) as resp:
            raw = await resp.read()
            try:
                return resp.status, (orjson.loads(raw) if raw else None)
            except orjson.JSONDecodeError:  # e.g. "404 page not found"
                return resp.status, raw.decode(errors="replace")

    async def resources(self, api_version: str, *, refresh: bool = False) -> dict[str, Any]:
        """kind -> (plural, namespaced) for one group/version ({} when not served)."""
        if refresh or api_version not in self._resources:
            path = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
            status, body = await self.request("GET", path)
            found = {}
            if status == 200:
                for r in body["resources"]:
                    if "/" not in r["name"]:
                        found[r["kind"]] = (r["name"], r["namespaced"])
            self._resources[api_version] = found
        return self._resources[api_version]

    async def ensure_crd(self, crd: Doc) -> None:
        """Install a CRD if its kind is not served yet, and wait until it is."""
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        version = next(v["name"] for v in crd["spec"]["versions"] if v.get("storage"))
        if kind in await self.resources(f"{group}/{version}"):
            return
        status, body = await self.request(
            "POST", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions", crd
        )
        assert status in (201, 409), f"installing CRD {crd['metadata']['name']}: {body}"
        for _ in range(300):
            if kind in await self.resources(f"{group}/{version}", refresh=True):
                return
            await asyncio.sleep(0.2)
        raise AssertionError(f"CRD {crd['metadata']['name']} not served after 60s")

    async def dry_run_apply(self, doc: Doc, namespace: str) -> tuple[int, Any]:
        api_version, kind, name = doc["apiVersion"], doc["kind"], doc["metadata"]["name"]
        kinds = await self.resources(api_version)
        assert kind in kinds, f"{api_version} {kind} is not served by the API server"
        plural, namespaced = kinds[kind]
        base = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
        if namespaced:
            doc = {**doc, "metadata": {**doc["metadata"], "namespace": namespace}}
            path = f"{base}/namespaces/{namespace}/{plural}/{name}"
        else:
            path = f"{base}/{plural}/{name}"
        query = f"?dryRun=All&fieldValidation=Strict&fieldManager={MANAGER}&force=true"
        return await self.request("PATCH", path + query, doc, ctype="application/apply-patch+yaml")


def _extra_crds() -> list[Doc]:
    """CRDs of the third-party kinds our manifests use (not shipped by the kube tier)."""
    src = CACHE / "kube" / "crd-sources"
    wanted = {
        "gateway.envoyproxy.io": {
            "Backend",
            "BackendTrafficPolicy",
            "EnvoyExtensionPolicy",
            "EnvoyPatchPolicy",
        },
        "monitoring.coreos.com": {"ServiceMonitor", "PodMonitor"},
        "keda.sh": {"ScaledObject"},
        "networking.istio.io": {"DestinationRule"},
    }
    crds = []
    for f in sorted(src.glob("*/*.yaml")):
        if f.parent.name.startswith(("gateway-api-", "inferencepool-")):
            continue  # the kube tier's own versions are already installed
        for doc in yaml.load_all(
            f.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)
        ):
            if not isinstance(doc, dict) or doc.get("kind") != "CustomResourceDefinition":
                continue
            if doc["spec"]["names"]["kind"] in wanted.get(doc["spec"]["group"], set()):
                crds.append(doc)
    found = {(c["spec"]["group"], c["spec"]["names"]["kind"]) for c in crds}
    expected = {(g, k) for g, ks in wanted.items() for k in ks}
    if found != expected:
        pytest.fail(
            f"CRD sources missing {sorted(expected - found)}; run `PDROUTE_FULL=1 scripts/bootstrap`",
            pytrace=False,
        )
    return crds


@pytest.fixture
async def api(cluster: KubeCluster) -> AsyncIterator[Api]:
    conn = aiohttp.TCPConnector(ssl=cluster.ssl_context())
    async with aiohttp.ClientSession(connector=conn) as s:
        a = Api(cluster, s)
        for crd in await asyncio.to_thread(_extra_crds):
            await a.ensure_crd(crd)
        yield a


async def _namespace(api: Api) -> str:
    name = f"t-{secrets.token_hex(4)}"
    status, body = await api.request(
        "POST",
        "/api/v1/namespaces",
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}},
    )
    assert status == 201, body
    return name


async def _dry_run_all(api: Api, docs: list[Doc], ns: str) -> list[Any]:
    failures = []
    answers = []
    for doc in docs:
        status, body = await api.dry_run_apply(doc, ns)
        if status not in (200, 201):
            failures.append(f"{doc['kind']}/{doc['metadata']['name']}: HTTP {status}: {body}")
        answers.append(body)
    assert failures == []
    return answers


VALUE_SETS: list[tuple[str, list[str]]] = [("defaults", [])] + [
    (p.stem, ["-f", str(p)]) for p in EXAMPLES
]


@pytest.mark.parametrize(("name", "args"), VALUE_SETS, ids=[n for n, _ in VALUE_SETS])
async def test_chart_dry_run(api: Api, helm: str, name: str, args: list[str]) -> None:
    ns = await _namespace(api)
    docs = load_docs(await asyncio.to_thread(helm_template, helm, *args, namespace=ns))
    answers = await _dry_run_all(api, docs, ns)
    pool = next(a for a in answers if a["kind"] == "InferencePool")
    sent = next(d for d in docs if d["kind"] == "InferencePool")
    assert pool["spec"]["endpointPickerRef"] == {
        **sent["spec"]["endpointPickerRef"],
        **pool["spec"]["endpointPickerRef"],
    }
    assert pool["metadata"]["namespace"] == ns
    # Dry run stored nothing.
    status, listing = await api.request(
        "GET", f"/apis/inference.networking.k8s.io/v1/namespaces/{ns}/inferencepools"
    )
    assert status == 200 and listing["items"] == []


GATEWAY_FILES = sorted(
    p for p in GATEWAY_MANIFESTS.rglob("*.yaml") if not p.name.endswith("-values.yaml")
) + sorted((REPO_ROOT / "e2e" / "manifests").glob("*.yaml"))


@pytest.mark.parametrize(
    "path", GATEWAY_FILES, ids=[str(p.relative_to(REPO_ROOT)) for p in GATEWAY_FILES]
)
async def test_gateway_manifest_dry_run(api: Api, path: Path) -> None:
    ns = await _namespace(api)
    text = await asyncio.to_thread(path.read_text)
    await _dry_run_all(api, load_docs(text), ns)


async def test_dry_run_rejects_unknown_fields(api: Api) -> None:
    """The check has teeth: strict field validation and CRD enums are enforced."""
    ns = await _namespace(api)
    pool = {
        "apiVersion": "inference.networking.k8s.io/v1",
        "kind": "InferencePool",
        "metadata": {"name": "p"},
        "spec": {
            "selector": {"matchLabels": {"a": "b"}},
            "targetPorts": [{"number": 8000}],
            "endpointPickerRef": {"name": "e", "port": {"number": 9002}, "failureMode": "Maybe"},
        },
    }
    status, body = await api.dry_run_apply(pool, ns)
    assert status == 422, body
    assert "failureMode" in str(body)
    deploy = load_docs(_DEPLOYMENT)[0]
    deploy["spec"]["replica"] = 1
    status, body = await api.dry_run_apply(deploy, ns)
    # Server-side apply refuses undeclared fields of built-in kinds while building the
    # typed patch (answered as 500 "field not declared in schema").
    assert status >= 400, body
    assert "replica" in str(body)


_DEPLOYMENT = """
apiVersion: apps/v1
kind: Deployment
metadata: {name: x}
spec:
  selector: {matchLabels: {a: b}}
  template:
    metadata: {labels: {a: b}}
    spec: {containers: [{name: c, image: i}]}
"""


async def _can(api: Api, user: str, ns: str, verb: str, *gr: str) -> bool:
    group, resource = gr
    review = {
        "apiVersion": "authorization.k8s.io/v1",
        "kind": "SubjectAccessReview",
        "spec": {
            "user": user,
            "groups": ["system:serviceaccounts", f"system:serviceaccounts:{ns}"],
            "resourceAttributes": {
                "namespace": ns,
                "verb": verb,
                "group": group,
                "resource": resource,
            },
        },
    }
    status, body = await api.request(
        "POST", "/apis/authorization.k8s.io/v1/subjectaccessreviews", review
    )
    assert status == 201, body
    return bool(body["status"].get("allowed"))


async def test_rbac_grants_exactly_what_the_components_use(api: Api, helm: str) -> None:
    """Create the chart's Roles for real; ask the RBAC authorizer what each SA may do."""
    ns = await _namespace(api)
    other = await _namespace(api)
    docs = load_docs(
        await asyncio.to_thread(
            helm_template,
            helm,
            "-f",
            str(EXAMPLES[0].parent / "simulator.yaml"),
            "--set",
            "epp.replicas=2",
            namespace=ns,
        )
    )
    for doc in docs:
        if doc["kind"] in ("Role", "RoleBinding"):
            plural = "roles" if doc["kind"] == "Role" else "rolebindings"
            status, body = await api.request(
                "POST", f"/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/{plural}", doc
            )
            assert status == 201, body

    epp = f"system:serviceaccount:{ns}:pdroute-epp"
    sidecar = f"system:serviceaccount:{ns}:pdroute-model-server"
    pool = ("inference.networking.k8s.io", "inferencepools")
    # What pdroute.kube (pool/pod informers, leader election) does as the EPP.
    for verb in ("get", "list", "watch"):
        assert await _can(api, epp, ns, verb, "", "pods")
        assert await _can(api, epp, ns, verb, *pool)
        assert await _can(api, sidecar, ns, verb, "", "pods")
        assert await _can(api, sidecar, ns, verb, *pool)
    for verb in ("get", "create", "update"):
        assert await _can(api, epp, ns, verb, "coordination.k8s.io", "leases")
    assert await _can(api, epp, ns, "create", "", "events")
    # ... and nothing more.
    assert not await _can(api, epp, ns, "get", "", "secrets")
    assert not await _can(api, epp, ns, "delete", "", "pods")
    assert not await _can(api, epp, ns, "update", *pool)
    assert not await _can(api, epp, other, "list", "", "pods")
    assert not await _can(api, sidecar, ns, "create", "coordination.k8s.io", "leases")
    assert not await _can(api, sidecar, ns, "get", "", "secrets")


async def _readiness(port: int) -> str:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            resp = await stub.Check(health_pb2.HealthCheckRequest(service="readiness"), timeout=2)
        except grpc.aio.AioRpcError as e:
            return f"rpc error {e.code().name}"
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status))


async def _start_epp_from_chart(
    api: Api, cluster: KubeCluster, helm: str, tmp: Path, *, lease_rbac: bool
) -> tuple[asyncio.subprocess.Process, int, str]:
    """Create the chart's Role, RoleBinding and InferencePool for real, then run the real
    EPP with the chart's args, authenticated as the kube tier's `epp` user."""
    ns = await _namespace(api)
    docs = load_docs(
        await asyncio.to_thread(
            helm_template,
            helm,
            "-f",
            str(EXAMPLES[0].parent / "simulator.yaml"),
            "--set",
            "epp.replicas=2",  # leader election on: the EPP must write its Lease
            namespace=ns,
        )
    )
    for doc in docs:
        kind = doc["kind"]
        if kind == "Role" and doc["metadata"]["name"] == "pdroute-epp":
            if not lease_rbac:
                doc["rules"] = [r for r in doc["rules"] if "leases" not in r["resources"]]
            path = f"/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/roles"
        elif kind == "RoleBinding" and doc["metadata"]["name"] == "pdroute-epp":
            # Out of a pod the EPP authenticates as user "epp" instead of its ServiceAccount.
            doc["subjects"] = [
                {"kind": "User", "name": "epp", "apiGroup": "rbac.authorization.k8s.io"}
            ]
            path = f"/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/rolebindings"
        elif kind == "InferencePool":
            path = f"/apis/inference.networking.k8s.io/v1/namespaces/{ns}/inferencepools"
        else:
            continue
        status, body = await api.request("POST", path, doc)
        assert status == 201, body

    deploy = next(
        d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "pdroute-epp"
    )
    epp = deploy["spec"]["template"]["spec"]["containers"][0]
    config = tmp / "epp-config.yaml"
    cm = next(
        d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "pdroute-epp"
    )
    config.write_text(cm["data"]["epp-config.yaml"])
    health = free_port()
    overrides = {
        "--grpc-port": str(free_port()),
        "--grpc-health-port": str(health),
        "--metrics-port": str(free_port()),
        "--config-file": str(config),
    }
    args = []
    for arg in epp["args"]:
        key = arg.split("=", 1)[0]
        if key == "--secure-serving":
            args.append("--no-secure-serving")  # the health check below is plaintext gRPC
        elif key in overrides:
            args.append(f"{key}={overrides[key]}")
        else:
            args.append(arg)
    args += [
        "--host=127.0.0.1",
        f"--kube-api-server={cluster.url}",
        f"--kube-token-file={cluster.epp_token_file}",
        f"--kube-ca-file={cluster.ca_file}",
        "--ha-retry-period=0.5",
    ]
    assert "--ha-enable-leader-election" in args
    env = {**os.environ, "NAMESPACE": ns, "POD_NAME": "epp-test-0"}
    with (tmp / "epp.log").open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "pdroute.cli",
            *epp["command"][1:],
            *args,
            env=env,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=log,
        )
    return proc, health, ns


async def test_real_epp_runs_with_the_charts_args_and_rbac(
    api: Api, cluster: KubeCluster, helm: str, tmp_path: Path
) -> None:
    """The chart's EPP args + Role are enough for the real EPP: it syncs the pool, wins
    the Lease (leader election) and reports ready; without the Lease rule it cannot."""
    proc, health, ns = await _start_epp_from_chart(api, cluster, helm, tmp_path, lease_rbac=True)
    try:
        status = ""
        for _ in range(120):
            status = await _readiness(health)
            if status == "SERVING" or proc.returncode is not None:
                break
            await asyncio.sleep(0.5)
        log = (tmp_path / "epp.log").read_text(errors="replace")[-3000:]
        assert status == "SERVING", f"{status}; EPP log:\n{log}"
        code, lease = await api.request(
            "GET", f"/apis/coordination.k8s.io/v1/namespaces/{ns}/leases/epp-{ns}-pdroute"
        )
        assert code == 200, lease
        assert lease["spec"]["holderIdentity"] == "epp-test-0"
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 30)

    denied = tmp_path / "denied"
    denied.mkdir()
    proc, health, _ = await _start_epp_from_chart(api, cluster, helm, denied, lease_rbac=False)
    try:
        statuses = set()
        for _ in range(16):
            statuses.add(await _readiness(health))
            await asyncio.sleep(0.5)
        assert "SERVING" not in statuses
        assert proc.returncode is None  # alive and healthy otherwise, just not the leader
        log = (denied / "epp.log").read_text(errors="replace")
        assert "403" in log or "forbidden" in log.lower(), log[-3000:]
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 30)
