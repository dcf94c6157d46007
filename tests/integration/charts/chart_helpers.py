"""Shared helpers of the chart / manifest tests (imported by conftest.py and the tests)."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[3]
CHART = REPO_ROOT / "charts" / "pdroute"
EXAMPLES = sorted((CHART / "examples").glob("*.yaml"))
GATEWAY_MANIFESTS = REPO_ROOT / "gateway-manifests"
E2E = REPO_ROOT / "e2e"
CACHE = Path(os.environ.get("PDROUTE_CACHE", str(Path.home() / ".cache" / "pdroute")))
KUBE_DIR = CACHE / "kube"
KUBE_BIN = Path(os.environ.get("PDROUTE_KUBE_BIN", str(KUBE_DIR / "bin")))
INSTALL = "PDROUTE_FULL=1 scripts/bootstrap"
RELEASE = "pdroute"

Doc = dict[str, Any]


def tool(name: str) -> str:
    """Path of a binary installed by scripts/bootstrap.d/55-helm.sh, or fail with the fix."""
    path = KUBE_BIN / name
    if not os.access(path, os.X_OK):
        pytest.fail(f"{name} is not installed ({path}); run `{INSTALL}`", pytrace=False)
    return str(path)


@dataclass
class Validation:
    """kubeconform's verdict on one input."""

    resources: list[dict[str, Any]]

    def problems(self) -> list[str]:
        return [
            f"{r.get('kind')}/{r.get('name')}: {r.get('status')}: {r.get('msg', '')}"
            for r in self.resources
            if r.get("status") != "statusValid"
        ]


Validator = Callable[[str], Validation]


def kubeconform_validator(kubeconform: str, schema_dir: Path) -> Validator:
    """validate(text) -> Validation: kubeconform -strict with only our offline schemas."""
    location = str(schema_dir) + "/{{ .Group }}/{{ .ResourceKind }}_{{ .ResourceAPIVersion }}.json"

    def run(text: str) -> Validation:
        r = subprocess.run(
            [
                kubeconform,
                "-strict",
                "-verbose",
                "-output",
                "json",
                "-schema-location",
                location,
                "-",
            ],
            input=text,
            capture_output=True,
            text=True,
            check=False,
            timeout=120,
        )
        out = json.loads(r.stdout or "{}")
        resources = list(out.get("resources") or [])
        if r.returncode != 0 and not resources:
            raise AssertionError(f"kubeconform failed: {r.stderr or r.stdout}")
        return Validation(resources)

    return run


class HelmError(Exception):
    """helm exited non-zero; the message is its stderr."""


def helm_template(helm: str, *args: str, namespace: str = "default") -> str:
    """``helm template pdroute charts/pdroute ARGS``; raises HelmError with helm's message."""
    r = subprocess.run(
        [helm, "template", RELEASE, str(CHART), "--namespace", namespace, *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    if r.returncode != 0:
        raise HelmError(r.stderr)
    return r.stdout


def load_docs(text: str) -> list[Doc]:
    return [d for d in yaml.safe_load_all(text) if isinstance(d, dict)]


def find(docs: Iterable[Doc], kind: str, name: str | None = None) -> list[Doc]:
    return [
        d for d in docs if d.get("kind") == kind and (name is None or d["metadata"]["name"] == name)
    ]


def one(docs: Iterable[Doc], kind: str, name: str | None = None) -> Doc:
    found = find(docs, kind, name)
    assert len(found) == 1, f"expected one {kind} {name or ''}, got {len(found)}"
    return found[0]


def container(pod_spec: Doc, name: str) -> Doc:
    for c in [*pod_spec.get("initContainers", []), *pod_spec.get("containers", [])]:
        if c["name"] == name:
            return dict(c)
    raise AssertionError(f"no container {name!r} in pod spec")
