"""A private etcd + kube-apiserver for tests (``scripts/kube-apiserver.sh``).

One place for what every kube-backed test module needs: where the binaries and
CRDs live (``$PDROUTE_CACHE/kube``, overridable with ``PDROUTE_KUBE_BIN`` /
``PDROUTE_KUBE_CRDS``), a failure naming the bootstrap command when they are
missing, starting the control plane in a private temp dir, parsing the ``env``
file the script writes, and stopping it afterwards. Importable as
``tests.kubeapi`` (pytest runs with ``pythonpath = ["."]``); it imports nothing of
the product, so any test module can use it.
"""

from __future__ import annotations

import os
import ssl
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "scripts" / "kube-apiserver.sh"
CACHE = Path(os.environ.get("PDROUTE_CACHE", str(Path.home() / ".cache" / "pdroute")))
KUBE_BIN = Path(os.environ.get("PDROUTE_KUBE_BIN", str(CACHE / "kube" / "bin")))
KUBE_CRDS = Path(os.environ.get("PDROUTE_KUBE_CRDS", str(CACHE / "kube" / "crds")))


@dataclass
class KubeCluster:
    """A running control plane: its dir (pid files, logs), URL, tokens and CA."""

    dir: Path
    url: str
    token: str
    token_file: str
    ca_file: str
    epp_token_file: str

    def _script(self, cmd: str) -> None:
        r = subprocess.run(
            [str(SCRIPT), cmd, str(self.dir)],
            check=False,
            capture_output=True,
            text=True,
            timeout=180,
        )
        if r.returncode != 0:
            raise RuntimeError(f"kube-apiserver.sh {cmd} failed: {r.stderr[-2000:]}")

    def stop_apiserver(self) -> None:
        self._script("stop-apiserver")

    def start_apiserver(self) -> None:
        self._script("start-apiserver")

    def apiserver_running(self) -> bool:
        pid_file = self.dir / "apiserver.pid"
        if not pid_file.exists():
            return False
        try:
            os.kill(int(pid_file.read_text()), 0)
        except (OSError, ValueError):
            return False
        return True

    def ensure_apiserver(self) -> None:
        """Start the apiserver again if a test left it stopped."""
        if not self.apiserver_running():
            self.start_apiserver()

    def ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=self.ca_file)


def require_kube() -> None:
    """Fail (never skip) with the install command when binaries or CRDs are missing."""
    missing = [b for b in ("etcd", "kube-apiserver") if not (KUBE_BIN / b).exists()]
    if missing or not list(KUBE_CRDS.glob("*.yaml")):
        pytest.fail(
            f"kube binaries/CRDs missing ({missing or 'CRDs'} under {KUBE_BIN.parent}); "
            "run `PDROUTE_FULL=1 scripts/bootstrap` (or `PDROUTE_KUBE=1 scripts/bootstrap`)",
            pytrace=False,
        )


def read_env(path: Path) -> dict[str, str]:
    """The ``KEY=value`` lines the script writes to ``DIR/env``."""
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)


@contextmanager
def private_control_plane(prefix: str = "pdroute-kube-") -> Iterator[KubeCluster]:
    """Start etcd + kube-apiserver in a fresh temp dir; stop them on exit."""
    require_kube()
    d = Path(tempfile.mkdtemp(prefix=prefix)) / "cp"
    r = subprocess.run(
        [str(SCRIPT), "start", str(d)], check=False, capture_output=True, text=True, timeout=300
    )
    try:
        if r.returncode != 0:
            pytest.fail(f"starting kube-apiserver failed:\n{r.stderr[-3000:]}", pytrace=False)
        env = read_env(d / "env")
        yield KubeCluster(
            dir=d,
            url=env["KUBE_URL"],
            token=env["KUBE_TOKEN"],
            token_file=env["KUBE_TOKEN_FILE"],
            ca_file=env["KUBE_CA_FILE"],
            epp_token_file=env["KUBE_EPP_TOKEN_FILE"],
        )
    finally:
        subprocess.run([str(SCRIPT), "stop", str(d)], check=False, capture_output=True, timeout=60)
