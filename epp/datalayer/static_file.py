"""Static endpoint source: a YAML file listing the pool's endpoints, reloaded on change.

For deployments without Kubernetes (``pdroute up``, bare metal, a ConfigMap mounted
into the EPP pod) the endpoint set is a small YAML file; the format is documented in
``epp/datalayer/README.md`` with an example in ``endpoints-example.yaml``.

Design:

* :func:`load_endpoints_file` is pure (bytes in, endpoints out): every problem raises
  :class:`EndpointFileError` naming the file and the offending key
  (``endpoints[2].port``), so an operator can fix the file without guessing.
* :class:`StaticFileSource` polls the file every ``poll_interval_s`` (a sleep, no busy
  loop). A poll ``stat``\\s the file; only when ``(inode, size, mtime)`` changed, or the
  mtime is so recent that a same-size rewrite within the filesystem's timestamp
  granularity could hide behind it (git's "racy" rule), is the file read and its
  content hashed. Only a changed hash re-parses and replaces the set, atomically, via
  ``Datastore.replace_endpoints`` (one call: the datastore never sees half a file).
  Kubernetes ConfigMap volumes swap a symlink, which changes the inode: caught.
* At start-up a bad or missing file is fatal (``run`` raises); on reload the error is
  logged once per distinct file content and the previous set is kept.
* File I/O and YAML parsing (up to ``MAX_FILE_BYTES``) run in a worker thread, so the
  event loop never blocks on a slow disk or a large file.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import yaml

from epp.datastore import Datastore, Endpoint

log = logging.getLogger(__name__)

#: Files larger than this are refused (bounded memory; an endpoint list is KBs).
MAX_FILE_BYTES = 4 * 1024 * 1024
#: A file modified less than this many seconds before it was read is re-read even
#: when its stat is unchanged (timestamp granularity can hide a same-size rewrite).
RACY_WINDOW_S = 2.0

_ENDPOINT_KEYS = frozenset(
    {
        "name",
        "address",
        "port",
        "ports",
        "labels",
        "metricsPort",
        "metricsPorts",
        "metricsAddress",
        "engine",
    }
)

Sleep = Callable[[float], Awaitable[None]]


class EndpointFileError(ValueError):
    """The endpoint file is missing or invalid; ``path`` and ``key`` say where."""

    def __init__(self, path: str, key: str, message: str) -> None:
        self.path = path
        self.key = key
        self.message = message
        where = f"{path}: {key}: " if key else f"{path}: "
        super().__init__(where + message)


def _safe_load(data: bytes) -> Any:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return yaml.load(data, Loader=loader)  # a safe loader


def _port(path: str, key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise EndpointFileError(path, key, f"must be an integer port, got {value!r}")
    if not 1 <= value <= 65535:
        raise EndpointFileError(path, key, f"port {value} out of range 1..65535")
    return value


def _str(path: str, key: str, value: Any, *, required: bool = True) -> str | None:
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value.strip():
        raise EndpointFileError(path, key, f"must be a non-empty string, got {value!r}")
    return value.strip()


def _host_port(address: str, port: int) -> str:
    if ":" in address and not address.startswith("["):
        return f"[{address}]:{port}"
    return f"{address}:{port}"


def _endpoint_entries(path: str, index: int, raw: Any) -> list[Endpoint]:
    base = f"endpoints[{index}]"
    if not isinstance(raw, Mapping):
        raise EndpointFileError(path, base, f"must be a mapping, got {type(raw).__name__}")
    unknown = sorted(str(k) for k in raw if k not in _ENDPOINT_KEYS)
    if unknown:
        raise EndpointFileError(
            path,
            f"{base}.{unknown[0]}",
            f"unknown key (allowed: {', '.join(sorted(_ENDPOINT_KEYS))})",
        )
    address = _str(path, f"{base}.address", raw.get("address"))
    assert address is not None
    name = _str(path, f"{base}.name", raw.get("name", address))
    assert name is not None

    if "port" in raw and "ports" in raw:
        raise EndpointFileError(path, f"{base}.ports", "give either port or ports, not both")
    if "ports" in raw:
        ports_raw = raw["ports"]
        if not isinstance(ports_raw, list) or not ports_raw:
            raise EndpointFileError(path, f"{base}.ports", "must be a non-empty list of ports")
        ports = [_port(path, f"{base}.ports[{i}]", p) for i, p in enumerate(ports_raw)]
    elif "port" in raw:
        ports = [_port(path, f"{base}.port", raw["port"])]
    else:
        raise EndpointFileError(path, f"{base}.port", "missing (give port or ports)")

    metrics_ports: list[int | None]
    if "metricsPort" in raw and "metricsPorts" in raw:
        raise EndpointFileError(path, f"{base}.metricsPorts", "give metricsPort or metricsPorts")
    if "metricsPorts" in raw:
        mp = raw["metricsPorts"]
        if not isinstance(mp, list) or len(mp) != len(ports):
            raise EndpointFileError(
                path,
                f"{base}.metricsPorts",
                f"must be a list with one port per entry of ports ({len(ports)})",
            )
        metrics_ports = [_port(path, f"{base}.metricsPorts[{i}]", p) for i, p in enumerate(mp)]
    elif "metricsPort" in raw:
        if len(ports) > 1:
            raise EndpointFileError(
                path, f"{base}.metricsPort", "with several ports use metricsPorts (one per rank)"
            )
        metrics_ports = [_port(path, f"{base}.metricsPort", raw["metricsPort"])]
    else:
        metrics_ports = [None] * len(ports)
    metrics_address = _str(
        path, f"{base}.metricsAddress", raw.get("metricsAddress"), required=False
    )
    engine = _str(path, f"{base}.engine", raw.get("engine"), required=False)

    labels_raw = raw.get("labels") or {}
    if not isinstance(labels_raw, Mapping):
        raise EndpointFileError(path, f"{base}.labels", "must be a mapping of string to string")
    labels: dict[str, str] = {}
    for k, v in labels_raw.items():
        if not isinstance(k, str) or not isinstance(v, str | int | float | bool) or v is None:
            raise EndpointFileError(path, f"{base}.labels.{k}", f"must be a scalar, got {v!r}")
        labels[k] = str(v).lower() if isinstance(v, bool) else str(v)
    frozen_labels = MappingProxyType(labels)

    out = []
    for rank, (port, mport) in enumerate(zip(ports, metrics_ports, strict=True)):
        metrics_address_full = None
        if mport is not None or metrics_address is not None:
            metrics_address_full = _host_port(metrics_address or address, mport or port)
        out.append(
            Endpoint(
                name=name if len(ports) == 1 else f"{name}-rank-{rank}",
                address=address,
                port=port,
                labels=frozen_labels,
                metrics_address=metrics_address_full,
                engine=engine,
            )
        )
    return out


def load_endpoints_file(path: str, data: bytes) -> tuple[Endpoint, ...]:
    """Parse an endpoint file's bytes. Raises :class:`EndpointFileError`."""
    try:
        doc = _safe_load(data)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else "yaml"
        raise EndpointFileError(path, where, f"not valid YAML: {exc}") from None
    if isinstance(doc, Mapping):
        unknown = sorted(str(k) for k in doc if k != "endpoints")
        if unknown:
            raise EndpointFileError(path, unknown[0], "unknown top-level key (expected: endpoints)")
        items = doc.get("endpoints")
    else:
        items = doc
    if items is None:
        items = []
    if not isinstance(items, list):
        raise EndpointFileError(path, "endpoints", "must be a list of endpoints")
    seen: dict[str, int] = {}
    result: list[Endpoint] = []
    for i, raw in enumerate(items):
        for ep in _endpoint_entries(path, i, raw):
            if ep.key in seen:
                raise EndpointFileError(
                    path,
                    f"endpoints[{i}]",
                    f"duplicate endpoint {ep.key} (also in endpoints[{seen[ep.key]}])",
                )
            seen[ep.key] = i
            result.append(ep)
    return tuple(result)


@dataclass(frozen=True, slots=True)
class _Stat:
    ino: int
    size: int
    mtime_ns: int


def _read_file(path: str) -> tuple[_Stat, bytes]:
    """Blocking: stat + read (run in a thread). Raises EndpointFileError."""
    try:
        st = os.stat(path)
        if st.st_size > MAX_FILE_BYTES:
            raise EndpointFileError(
                path, "", f"file is {st.st_size} bytes (limit {MAX_FILE_BYTES})"
            )
        with open(path, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise EndpointFileError(path, "", f"cannot read: {exc.strerror or exc}") from None
    if len(data) > MAX_FILE_BYTES:
        raise EndpointFileError(path, "", f"file exceeds {MAX_FILE_BYTES} bytes")
    return _Stat(st.st_ino, st.st_size, st.st_mtime_ns), data


def _stat(path: str) -> _Stat | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return _Stat(st.st_ino, st.st_size, st.st_mtime_ns)


class StaticFileSource:
    """An :class:`~epp.datalayer.source.EndpointSource` backed by a YAML file."""

    def __init__(
        self,
        path: str,
        *,
        poll_interval_s: float = 1.0,
        sleep: Sleep = asyncio.sleep,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        if poll_interval_s <= 0:
            raise ValueError("poll_interval_s must be > 0")
        self._path = path
        self._poll_interval_s = poll_interval_s
        self._sleep = sleep
        self._wall_clock = wall_clock
        self._ready = False
        self._stat: _Stat | None = None
        self._read_at = 0.0
        self._digest: bytes | None = None
        self._bad_digest: bytes | None = None
        self._last_error: str | None = None
        #: Number of successful (set-changing) loads, for observability and tests.
        self.loads = 0

    @property
    def path(self) -> str:
        return self._path

    def ready(self) -> bool:
        return self._ready

    def load(self) -> tuple[Endpoint, ...]:
        """Read and validate the file now (blocking; for start-up checks)."""
        _, data = _read_file(self._path)
        return load_endpoints_file(self._path, data)

    async def run(self, datastore: Datastore) -> None:
        # Start-up: errors propagate (fatal).
        st, data = await asyncio.to_thread(_read_file, self._path)
        endpoints = await asyncio.to_thread(load_endpoints_file, self._path, data)
        self._remember(st, data)
        datastore.replace_endpoints(endpoints)
        self.loads += 1
        self._ready = True
        log.info("loaded %d endpoints from %s", len(endpoints), self._path)
        while True:
            await self._sleep(self._poll_interval_s)
            await self.poll_once(datastore)

    def _remember(self, st: _Stat, data: bytes) -> None:
        self._stat = st
        self._read_at = self._wall_clock()
        self._digest = hashlib.blake2b(data, digest_size=16).digest()

    def _unchanged(self, st: _Stat | None) -> bool:
        if st is None or st != self._stat:
            return False
        # Racy: modified within the window before our read -> content may differ.
        return st.mtime_ns / 1e9 < self._read_at - RACY_WINDOW_S

    async def poll_once(self, datastore: Datastore) -> bool:
        """One poll: returns True when a new set was delivered."""
        st = await asyncio.to_thread(_stat, self._path)
        if self._unchanged(st):
            return False
        try:
            st2, data = await asyncio.to_thread(_read_file, self._path)
        except EndpointFileError as exc:
            self._report(str(exc))
            return False
        digest = hashlib.blake2b(data, digest_size=16).digest()
        if digest == self._digest:
            self._stat, self._read_at = st2, self._wall_clock()
            return False
        if digest == self._bad_digest:
            return False  # already reported; wait for the next edit
        try:
            endpoints = await asyncio.to_thread(load_endpoints_file, self._path, data)
        except EndpointFileError as exc:
            self._bad_digest = digest
            self._report(f"{exc}; keeping the previous endpoint set")
            return False
        self._remember(st2, data)
        self._bad_digest = None
        self._last_error = None
        datastore.replace_endpoints(endpoints)
        self.loads += 1
        log.info("reloaded %d endpoints from %s", len(endpoints), self._path)
        return True

    def _report(self, message: str) -> None:
        if message != self._last_error:
            log.error("endpoint file reload failed: %s", message)
            self._last_error = message

    @property
    def last_error(self) -> str | None:
        """The latest reload error, or None after a good (re)load."""
        return self._last_error
