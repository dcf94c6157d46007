"""Fixtures for the Helm chart / manifest checks: real helm, kubeconform and ShellCheck.

The binaries and schema sources come from ``scripts/bootstrap.d/55-helm.sh``
(``PDROUTE_FULL=1 scripts/bootstrap``); a missing one fails the test with that command.
kubeconform runs fully offline against schemas that ``tools/helm/crd2schema.py``
builds once per session from the Kubernetes OpenAPI document and the CRD sources.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from chart_helpers import INSTALL, KUBE_DIR, REPO_ROOT, Validator, kubeconform_validator, tool


@pytest.fixture(scope="session")
def helm() -> str:
    return tool("helm")


@pytest.fixture(scope="session")
def shellcheck() -> str:
    return tool("shellcheck")


@pytest.fixture(scope="session")
def crd_sources() -> Path:
    src = KUBE_DIR / "crd-sources"
    if not list(src.glob("*/.complete")):
        pytest.fail(f"CRD sources missing under {src}; run `{INSTALL}`", pytrace=False)
    return src


@pytest.fixture(scope="session")
def schema_dir(tmp_path_factory: pytest.TempPathFactory, crd_sources: Path) -> Path:
    """Strict kubeconform schemas for built-in kinds and every CRD source."""
    openapi = sorted((KUBE_DIR / "openapi").glob("kubernetes-*-swagger.json"))
    if not openapi:
        pytest.fail(f"Kubernetes OpenAPI document missing; run `{INSTALL}`", pytrace=False)
    out = tmp_path_factory.mktemp("schemas")
    script = REPO_ROOT / "tools" / "helm" / "crd2schema.py"
    cmd = [sys.executable, str(script), "--out", str(out), "--swagger", str(openapi[-1])]
    r = subprocess.run(
        [*cmd, str(crd_sources)], capture_output=True, text=True, check=False, timeout=300
    )
    assert r.returncode == 0, r.stderr
    return out


@pytest.fixture(scope="session")
def validate(schema_dir: Path) -> Validator:
    return kubeconform_validator(tool("kubeconform"), schema_dir)
