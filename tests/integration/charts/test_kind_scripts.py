"""e2e/kind-up.sh and kind-down.sh, run with recording stand-ins for docker/kind/kubectl/helm.

These machines have no Docker, so the scripts cannot create a real cluster here. What
this checks is the scripts' own logic: the steps run in order with the right files and
flags, re-runs are idempotent (existing cluster reused), the image name is split into
repository and tag for the chart, and kind-down only signals its own port-forward.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from chart_helpers import CHART, E2E, REPO_ROOT

BASH = shutil.which("bash") or "/bin/bash"
# Real tools the scripts use besides the stubbed ones (linked into a private PATH).
COREUTILS = (
    "basename",
    "cat",
    "date",
    "dirname",
    "grep",
    "mkdir",
    "nohup",
    "ps",
    "rm",
    "seq",
    "sleep",
    "touch",
)
STUB = f"""#!{BASH}
printf '%s %s\\n' "${{0##*/}}" "$*" >>"$STUB_LOG"
case "${{0##*/}} $*" in
  "kind get clusters"*) [ -f "$STUB_STATE/cluster" ] && echo pdroute-test ;;
  "kind create cluster"*) touch "$STUB_STATE/cluster" ;;
  "kind delete cluster"*) rm -f "$STUB_STATE/cluster" ;;
  *"get service"*) echo envoy-default-inference-gateway-1234 ;;
esac
exit 0
"""


@pytest.fixture
def stub_env(tmp_path: Path) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in COREUTILS:
        real = shutil.which(tool)
        assert real, f"{tool} not found"
        (bin_dir / tool).symlink_to(real)
    for tool in ("docker", "kind", "kubectl", "helm", "curl"):
        path = bin_dir / tool
        path.write_text(STUB)
        path.chmod(0o755)
    state = tmp_path / "state"
    state.mkdir()
    return {
        "PATH": str(bin_dir),
        "HOME": str(tmp_path),
        "XDG_STATE_HOME": str(tmp_path / "xdg"),
        "STUB_LOG": str(tmp_path / "calls.log"),
        "STUB_STATE": str(state),
        "PDROUTE_KIND_CLUSTER": "pdroute-test",
        "PDROUTE_E2E_PORT": "18080",
        "PDROUTE_IMAGE": "localhost:5000/team/pdroute:dev-1",
    }


def _run(script: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [BASH, str(E2E / script)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
        cwd=REPO_ROOT,
    )


def _calls(env: dict[str, str]) -> list[str]:
    return Path(env["STUB_LOG"]).read_text().splitlines()


def test_kind_up_runs_every_step_in_order(stub_env: dict[str, str]) -> None:
    r = _run("kind-up.sh", stub_env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "export PDROUTE_E2E_GATEWAY_URL=http://127.0.0.1:18080"
    calls = _calls(stub_env)

    def index(needle: str) -> int:
        return next(i for i, c in enumerate(calls) if needle in c)

    order = [
        "kind create cluster --name pdroute-test",
        "gateway-api-inference-extension/config/crd",
        "upgrade --install eg oci://docker.io/envoyproxy/gateway-helm",
        "upgrade --install aieg oci://docker.io/envoyproxy/ai-gateway-helm",
        "docker build -f",
        "kind load docker-image localhost:5000/team/pdroute:dev-1 --name pdroute-test",
        f"upgrade --install pdroute {CHART}",
        "gateway-manifests/envoy-gateway/gateway.yaml",
        "port-forward service/envoy-default-inference-gateway-1234 18080:80",
    ]
    positions = [index(n) for n in order]
    assert positions == sorted(positions)
    # The readiness probe goes through the gateway (the port-forward runs in the background).
    assert any(c.startswith("curl ") and "127.0.0.1:18080/v1/completions" in c for c in calls)
    install = calls[index(f"upgrade --install pdroute {CHART}")]
    assert "--set image.repository=localhost:5000/team/pdroute" in install
    assert "--set image.tag=dev-1" in install
    assert str(CHART / "examples" / "simulator.yaml") in install
    assert all("--kube-context kind-pdroute-test" in c for c in calls if c.startswith("helm "))
    assert all("--context kind-pdroute-test" in c for c in calls if c.startswith("kubectl "))
    pid_file = (
        Path(stub_env["XDG_STATE_HOME"]) / "pdroute-kind" / "pdroute-test" / "port-forward.pid"
    )
    assert pid_file.read_text().strip().isdigit()

    # Second run: the cluster is reused, not recreated.
    Path(stub_env["STUB_LOG"]).unlink()
    assert _run("kind-up.sh", stub_env).returncode == 0
    assert not any(c.startswith("kind create") for c in _calls(stub_env))


def test_kind_up_fails_clearly_without_docker(stub_env: dict[str, str]) -> None:
    (Path(stub_env["PATH"]) / "docker").unlink()
    r = _run("kind-up.sh", stub_env)
    assert r.returncode != 0
    assert "docker is not installed" in r.stderr
    assert not Path(stub_env["STUB_LOG"]).exists()  # nothing was touched


def test_kind_down_deletes_the_cluster_and_only_its_port_forward(
    stub_env: dict[str, str],
) -> None:
    assert _run("kind-up.sh", stub_env).returncode == 0
    state = Path(stub_env["XDG_STATE_HOME"]) / "pdroute-kind" / "pdroute-test"
    # An unrelated live process under the recorded pid must survive kind-down.
    bystander = subprocess.Popen(["sleep", "30"])
    try:
        (state / "port-forward.pid").write_text(f"{bystander.pid}\n")
        r = _run("kind-down.sh", stub_env)
        assert r.returncode == 0, r.stderr
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()
    assert "kind delete cluster --name pdroute-test" in _calls(stub_env)
    assert not state.exists()
    assert not (Path(stub_env["STUB_STATE"]) / "cluster").exists()
    # Idempotent: nothing left to delete is not an error.
    r = _run("kind-down.sh", stub_env)
    assert r.returncode == 0
    assert "no kind cluster named pdroute-test" in r.stderr


def test_scripts_are_executable() -> None:
    for script in ("kind-up.sh", "kind-down.sh"):
        assert os.access(E2E / script, os.X_OK), script
