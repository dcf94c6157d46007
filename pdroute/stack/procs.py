"""A small process supervisor for the local stack.

Each child runs in its own process group so that stopping the stack stops
everything a child started. :func:`spawn_in_group` and :func:`stop_process_group`
are the one way the stack (the supervisor, ``EnvoyProcess``, ``VllmServer``)
starts and stops such a process. Output goes to one log file per child under the
stack's run directory; on a failed start the tail of that log is shown.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path


class StackError(Exception):
    """A start-up problem the user can act on (port taken, binary missing, child died)."""


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def require_free_ports(ports: Mapping[str, int], host: str = "127.0.0.1") -> None:
    taken = [f"{what} port {port}" for what, port in ports.items() if not port_is_free(port, host)]
    if taken:
        raise StackError(
            "already in use on "
            + host
            + ": "
            + ", ".join(taken)
            + " (stop what holds them or pass other ports, see `pdroute up --help`)"
        )


def tail(path: Path, lines: int = 30) -> str:
    """The last ``lines`` lines of a child's log (from its last 32 KiB); "" if unreadable."""
    try:
        data = path.read_bytes()[-32768:]
    except OSError:
        return ""
    return "\n".join(data.decode("utf-8", "replace").splitlines()[-lines:])


def spawn_in_group(
    argv: Sequence[str],
    log_path: Path,
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    append: bool = True,
) -> subprocess.Popen[bytes]:
    """Start ``argv`` in a new session (its own process group), stdout and stderr to
    ``log_path`` (appended, or truncated when ``append`` is false), stdin from
    /dev/null. ``env`` is the full environment (None: inherit ours)."""
    with log_path.open("ab" if append else "wb") as log:
        return subprocess.Popen(
            list(argv),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=None if env is None else dict(env),
            cwd=None if cwd is None else str(cwd),
            start_new_session=True,
        )


def signal_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    """Send ``sig`` to ``proc``'s process group if ``proc`` is still running."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)


def wait_or_kill_group(proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    """Wait up to ``timeout_s`` for ``proc``; then SIGKILL its process group and reap it."""
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def stop_process_group(proc: subprocess.Popen[bytes], grace_s: float) -> None:
    """SIGTERM ``proc``'s process group, SIGKILL it after ``grace_s``. No-op once exited."""
    if proc.poll() is None:
        signal_group(proc, signal.SIGTERM)
        wait_or_kill_group(proc, grace_s)


@dataclass
class Child:
    name: str
    argv: list[str]
    log_path: Path
    env: dict[str, str] | None = None
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class Supervisor:
    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.children: list[Child] = []

    def start(
        self, name: str, argv: Sequence[str], *, env: Mapping[str, str] | None = None
    ) -> Child:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.run_dir / f"{name}.log"
        full_env = dict(os.environ)
        if env:
            full_env.update(env)
        try:
            proc = spawn_in_group(argv, log_path, env=full_env, append=False)
        except FileNotFoundError as e:
            raise StackError(f"{name}: cannot run {argv[0]!r}: {e.strerror}") from None
        child = Child(name, list(argv), log_path, dict(env or {}), proc)
        self.children.append(child)
        return child

    async def wait_ready(
        self,
        child: Child,
        probe: Callable[[], Awaitable[bool]],
        *,
        timeout_s: float,
        interval_s: float = 0.1,
    ) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not child.alive():
                code = child.proc.returncode if child.proc else None
                raise StackError(
                    f"{child.name} exited with code {code} during start-up; "
                    f"last lines of {child.log_path}:\n{tail(child.log_path)}"
                )
            with contextlib.suppress(Exception):
                if await probe():
                    return
            await asyncio.sleep(interval_s)
        raise StackError(
            f"{child.name} not ready after {timeout_s:.0f}s; "
            f"last lines of {child.log_path}:\n{tail(child.log_path)}"
        )

    def stop_all(self, grace_s: float = 5.0) -> None:
        """SIGTERM every child's process group (reverse start order), then SIGKILL."""
        for child in reversed(self.children):
            if child.proc is not None:
                signal_group(child.proc, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for child in reversed(self.children):
            if child.proc is not None:
                wait_or_kill_group(child.proc, max(0.0, deadline - time.monotonic()))
        self.children.clear()
