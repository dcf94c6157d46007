"""`pdroute up` fails early and clearly when it cannot start (the e2e suite in e2e/
covers a running stack: completions, chat streaming, P/D, failures)."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

from tests.netutil import free_port


def _up(
    tmp_path: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    import os

    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "pdroute.cli", "up", "--run-dir", str(tmp_path / "run"), *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        env=full_env,
    )


def test_port_taken_is_a_clear_error(tmp_path: Path, envoy_binary: str) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        taken = s.getsockname()[1]
        r = _up(tmp_path, "--port", str(taken), "--base-port", str(free_port()))
    assert r.returncode == 1
    assert f"gateway port {taken}" in r.stderr and "already in use" in r.stderr
    assert "Traceback" not in r.stderr


def test_missing_envoy_is_a_clear_error(tmp_path: Path) -> None:
    r = _up(
        tmp_path,
        "--port",
        str(free_port()),
        env={"PDROUTE_ENVOY": str(tmp_path / "no-such-envoy"), "PDROUTE_CACHE": str(tmp_path)},
    )
    assert r.returncode == 1
    assert "no-such-envoy" in r.stderr or "Envoy not found" in r.stderr
    assert "Traceback" not in r.stderr
