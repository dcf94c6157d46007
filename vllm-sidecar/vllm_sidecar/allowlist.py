"""SSRF guard: the prefill leg may only go to a member of the pool.

The ``x-prefiller-host-port`` header is set by the EPP, but the sidecar listens on
the pool's target port, which anything in the cluster can reach; without this
guard a caller could make the decode pod POST to any address. An
:class:`Allowlist` answers "is ``host:port`` a pool endpoint right now?".

Sources:

* :class:`StaticFileAllowlist` reads the same endpoint file as the EPP's
  ``--endpoints-file`` (``endpoints: [{address, port | ports, ...}]``, format
  documented in ``epp/datalayer/README.md``). Only ``address`` and ``port`` /
  ``ports`` matter here; other keys are the EPP's business and are ignored. The
  sidecar must not import the EPP, so this is a separate ~50-line parser of the
  same format. The file is re-checked every ``poll_interval_s`` (stat in a worker
  thread; re-read only when inode, size or mtime changed); a bad edit keeps the
  previous set and is logged.
* A Kubernetes-backed allowlist (pool members from the InferencePool's selector)
  plugs in through the same protocol: see :class:`MembersAllowlist`, which
  adapts anything exposing ``host_ports() -> Collection[str]`` (a live view).

Matching is exact on the normalised ``host:port`` string (lower-case host,
IPv6 in brackets), the form the EPP writes into the header.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any, Protocol

import yaml

log = logging.getLogger(__name__)

MAX_FILE_BYTES = 4 * 1024 * 1024


class AllowlistError(ValueError):
    """The endpoint file is missing or invalid; the message names file and key."""


class Allowlist(Protocol):
    def allows(self, host_port: str) -> bool: ...

    async def run(self) -> None:
        """Keep the set current until cancelled (may return at once)."""
        ...


def normalize_host_port(value: str) -> str | None:
    """``host:port`` in canonical form, or None when it is not one.

    Accepts ``1.2.3.4:80``, ``name:80``, ``[::1]:80``; rejects schemes, paths,
    user info, empty parts and ports outside 1..65535.
    """
    value = value.strip()
    if not value or any(c in value for c in "/@?#\\ \t") or len(value) > 300:
        return None
    if value.startswith("["):
        end = value.find("]")
        if end < 0 or value[end + 1 : end + 2] != ":":
            return None
        host, port_s = value[: end + 1], value[end + 2 :]
        if len(host) <= 2:
            return None
    else:
        host, sep, port_s = value.rpartition(":")
        if not sep or not host or ":" in host:
            return None
    if not port_s.isdigit() or not 1 <= int(port_s) <= 65535:
        return None
    return f"{host.lower()}:{int(port_s)}"


def _join(address: str, port: int) -> str:
    address = address.strip().lower()
    if ":" in address and not address.startswith("["):
        address = f"[{address}]"
    return f"{address}:{port}"


def parse_endpoints_file(path: str, data: bytes) -> frozenset[str]:
    """The ``host:port`` set of an endpoint file. Raises :class:`AllowlistError`."""
    try:
        doc: Any = yaml.load(data, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except yaml.YAMLError as e:
        raise AllowlistError(f"{path}: not valid YAML: {e}") from None
    items = doc.get("endpoints") if isinstance(doc, Mapping) else doc
    if items is None:
        return frozenset()
    if not isinstance(items, list):
        raise AllowlistError(f"{path}: endpoints: must be a list")
    out: set[str] = set()
    for i, raw in enumerate(items):
        key = f"endpoints[{i}]"
        if not isinstance(raw, Mapping):
            raise AllowlistError(f"{path}: {key}: must be a mapping")
        address = raw.get("address")
        if not isinstance(address, str) or not address.strip():
            raise AllowlistError(f"{path}: {key}.address: must be a non-empty string")
        if "ports" in raw:
            ports = raw["ports"]
            if not isinstance(ports, list) or not ports:
                raise AllowlistError(f"{path}: {key}.ports: must be a non-empty list")
        elif "port" in raw:
            ports = [raw["port"]]
        else:
            raise AllowlistError(f"{path}: {key}.port: missing (give port or ports)")
        for j, port in enumerate(ports):
            if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
                where = f"{key}.ports[{j}]" if "ports" in raw else f"{key}.port"
                raise AllowlistError(f"{path}: {where}: must be a port 1..65535, got {port!r}")
            out.add(_join(address, port))
    return frozenset(out)


def _read(path: Path) -> tuple[tuple[int, int, int], bytes | None]:
    st = path.stat()
    sig = (st.st_ino, st.st_size, st.st_mtime_ns)
    if st.st_size > MAX_FILE_BYTES:
        raise AllowlistError(f"{path}: larger than {MAX_FILE_BYTES} bytes")
    return sig, path.read_bytes()


class StaticFileAllowlist:
    """Pool members from an endpoint file; re-read when the file changes."""

    def __init__(self, path: str | Path, *, poll_interval_s: float = 2.0) -> None:
        self.path = Path(path)
        self.poll_interval_s = poll_interval_s
        try:
            self._sig, data = _read(self.path)
        except OSError as e:
            raise AllowlistError(f"{self.path}: cannot read endpoint file: {e.strerror}") from None
        assert data is not None
        self._members = parse_endpoints_file(str(self.path), data)
        self._bad_sig: tuple[int, int, int] | None = None

    @property
    def members(self) -> frozenset[str]:
        return self._members

    def allows(self, host_port: str) -> bool:
        return host_port in self._members

    async def reload_once(self) -> bool:
        """Re-read the file if it changed. True when the set was replaced."""
        try:
            st = await asyncio.to_thread(os.stat, self.path)
        except OSError as e:
            log.warning(
                "endpoint file %s: %s; keeping %d members", self.path, e, len(self._members)
            )
            return False
        sig = (st.st_ino, st.st_size, st.st_mtime_ns)
        if sig in (self._sig, self._bad_sig):
            return False
        try:
            sig, data = await asyncio.to_thread(_read, self.path)
            assert data is not None
            members = parse_endpoints_file(str(self.path), data)
        except (OSError, AllowlistError) as e:
            self._bad_sig = sig
            log.error("endpoint file reload failed, keeping the previous set: %s", e)
            return False
        self._sig, self._bad_sig = sig, None
        changed = members != self._members
        self._members = members
        if changed:
            log.info("endpoint file %s: %d pool members", self.path, len(members))
        return changed

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval_s)
            with contextlib.suppress(Exception):
                await self.reload_once()


class MembersAllowlist:
    """Adapts a live member view (e.g. a Kubernetes pool watcher) to :class:`Allowlist`.

    ``members`` returns the current ``host:port`` strings; ``runner`` (optional)
    keeps them current and is awaited by :meth:`run`.
    """

    def __init__(
        self,
        members: Callable[[], Collection[str]],
        runner: Callable[[], Any] | None = None,
    ) -> None:
        self._members = members
        self._runner = runner

    def allows(self, host_port: str) -> bool:
        return host_port in self._members()

    async def run(self) -> None:
        if self._runner is not None:
            await self._runner()


class AllowAll:
    """SSRF protection off (``--no-ssrf-protection``): development only."""

    def allows(self, host_port: str) -> bool:
        return True

    async def run(self) -> None:
        return None
