"""Targets of the e2e suite: a remote gateway, or a local stack started here."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Target:
    base_url: str  # http://host:port (no /v1)
    model: str
    #: The local stack's ready-file description; None for a remote gateway.
    local: dict[str, Any] | None = None
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def require_local(self, why: str) -> dict[str, Any]:
        # Tests that need this are marked ``local_stack`` and deselected (with a
        # printed reason) for a remote target, so reaching here remotely is a bug.
        assert self.local is not None, f"needs the local stack ({why}); mark it local_stack"
        return self.local

    def component(self, name: str) -> dict[str, Any]:
        local = self.require_local(f"component {name}")
        for c in local["components"]:
            if c["name"] == name:
                return dict(c)
        raise AssertionError(f"no component {name!r} in {[c['name'] for c in local['components']]}")


def _free_port_block(n: int) -> int:
    """A base port with n consecutive free ports (checked, not reserved)."""
    import socket

    for base in range(20000 + (os.getpid() % 200) * 50, 60000, 97):
        ok = True
        for p in range(base, base + n):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", p))
                except OSError:
                    ok = False
                    break
        if ok:
            return base
    raise RuntimeError("no free port block")


def start_local_stack(tmp: Path, *extra: str, timeout_s: float = 90.0) -> Target:
    base = _free_port_block(40)
    ready = tmp / "ready.json"
    argv = [
        sys.executable,
        "-m",
        "pdroute.cli",
        "up",
        "--port",
        str(base),
        "--base-port",
        str(base + 1),
        "--run-dir",
        str(tmp / "run"),
        "--ready-file",
        str(ready),
        *extra,
    ]
    log = (tmp / "up.log").open("wb")
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + timeout_s
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_local_stack(proc)
            out = (tmp / "up.log").read_text(errors="replace")[-4000:]
            pytest.fail(f"`pdroute up` did not become ready:\n{out}", pytrace=False)
        time.sleep(0.2)
    info = orjson.loads(ready.read_bytes())
    return Target(
        base_url=info["base_url"].removesuffix("/v1"), model=info["model"], local=info, proc=proc
    )


def stop_local_stack(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
