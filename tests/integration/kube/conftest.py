"""A real etcd + kube-apiserver for the ``kube`` tier (scripts/kube-apiserver.sh).

``kube_cluster`` (session) starts the control plane once in a private temp dir and
yields its URL and tokens; it can stop/start the apiserver process for outage tests.
``admin`` (per test) is an independent admin client (see kube_helpers.py).
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest
from kube_helpers import SCRIPT, Admin, KubeCluster

CACHE = Path(os.environ.get("PDROUTE_CACHE", str(Path.home() / ".cache" / "pdroute")))
KUBE_BIN = Path(os.environ.get("PDROUTE_KUBE_BIN", str(CACHE / "kube" / "bin")))
KUBE_CRDS = Path(os.environ.get("PDROUTE_KUBE_CRDS", str(CACHE / "kube" / "crds")))


@pytest.fixture(scope="session")
def kube_cluster() -> Iterator[KubeCluster]:
    missing = [b for b in ("etcd", "kube-apiserver") if not (KUBE_BIN / b).exists()]
    if missing or not list(KUBE_CRDS.glob("*.yaml")):
        pytest.fail(
            f"kube binaries/CRDs missing ({missing or 'CRDs'} under {KUBE_BIN.parent}); "
            "run `PDROUTE_FULL=1 scripts/bootstrap` (or `PDROUTE_KUBE=1 scripts/bootstrap`)",
            pytrace=False,
        )
    tmp = Path(tempfile.mkdtemp(prefix="pdroute-kube-"))
    d = tmp / "cp"
    r = subprocess.run(
        [str(SCRIPT), "start", str(d)], check=False, capture_output=True, text=True, timeout=300
    )
    cluster: KubeCluster | None = None
    try:
        if r.returncode != 0:
            pytest.fail(f"starting kube-apiserver failed:\n{r.stderr[-3000:]}", pytrace=False)
        env = dict(
            line.split("=", 1) for line in (d / "env").read_text().splitlines() if "=" in line
        )
        cluster = KubeCluster(
            dir=d,
            url=env["KUBE_URL"],
            token=env["KUBE_TOKEN"],
            token_file=env["KUBE_TOKEN_FILE"],
            ca_file=env["KUBE_CA_FILE"],
            epp_token_file=env["KUBE_EPP_TOKEN_FILE"],
        )
        yield cluster
    finally:
        subprocess.run([str(SCRIPT), "stop", str(d)], check=False, capture_output=True, timeout=60)


@pytest.fixture
async def admin(kube_cluster: KubeCluster) -> AsyncIterator[Admin]:
    conn = aiohttp.TCPConnector(ssl=kube_cluster.ssl_context())
    async with aiohttp.ClientSession(connector=conn) as s:
        yield Admin(kube_cluster, s)
