"""A small asyncio Kubernetes API client: get / list / watch / create / update.

Design:
- One :class:`aiohttp.ClientSession` per client; bearer-token auth (the token file is
  re-read periodically, so rotated service-account tokens keep working), TLS verified
  against the cluster CA unless explicitly disabled.
- Objects are decoded with msgspec into the typed structs of :mod:`pdroute.kube.types`;
  unknown fields are skipped, so decoded objects are small.
- A watch is a streamed GET; lines are split by hand with a hard cap on one event's
  size (``max_event_bytes``), so a misbehaving server cannot grow our memory unbounded.
- Errors: :class:`ApiError` (the server answered with a non-2xx status; ``.gone`` for
  410) and :class:`KubeUnavailable` (no answer: connection refused/reset, timeout).
  Callers decide retry policy; :class:`Backoff` gives exponential backoff with full
  jitter.
"""

from __future__ import annotations

import os
import random
import ssl
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import msgspec

from pdroute.kube.types import RawList, RawWatchEvent, Status

T = TypeVar("T")

SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
_TOKEN_REREAD_S = 60.0


class KubeError(Exception):
    """Base of the errors this package raises."""


class KubeConfigError(KubeError, ValueError):
    """Bad or missing connection settings; the message names the flag or file."""


class KubeUnavailable(KubeError):
    """The API server did not answer (connection refused/reset, timeout, broken stream)."""


class ApiError(KubeError):
    """The API server answered with an error status."""

    def __init__(self, status: int, reason: str = "", message: str = "") -> None:
        super().__init__(f"kube-apiserver: HTTP {status} {reason}: {message}".rstrip(": "))
        self.status = status
        self.reason = reason
        self.message = message

    @property
    def gone(self) -> bool:
        """410: the resourceVersion we watched from is too old; relist."""
        return self.status == 410

    @property
    def not_found(self) -> bool:
        return self.status == 404

    @property
    def conflict(self) -> bool:
        return self.status == 409


@dataclass(frozen=True, slots=True)
class KubeConfig:
    """How to reach the API server."""

    server: str
    token: str | None = None
    token_file: str | None = None
    ca_file: str | None = None
    insecure_skip_tls_verify: bool = False
    #: Namespace of this process (the service account's), used as a default.
    namespace: str = "default"

    @classmethod
    def in_cluster(cls, sa_dir: Path = SA_DIR) -> KubeConfig:
        """The pod's service account, as every in-cluster client finds it."""
        host = os.environ.get("KUBERNETES_SERVICE_HOST")
        port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        if not host:
            raise KubeConfigError(
                "not running in a pod (KUBERNETES_SERVICE_HOST unset); pass --kube-api-server"
            )
        if ":" in host:
            host = f"[{host}]"
        token_file = sa_dir / "token"
        if not token_file.exists():
            raise KubeConfigError(f"service-account token {token_file} does not exist")
        ns_file = sa_dir / "namespace"
        ns = ns_file.read_text().strip() if ns_file.exists() else "default"
        ca = sa_dir / "ca.crt"
        return cls(
            server=f"https://{host}:{port}",
            token_file=str(token_file),
            ca_file=str(ca) if ca.exists() else None,
            namespace=ns,
        )


@dataclass
class Backoff:
    """Exponential backoff with full jitter: delay ~ U(0, min(cap, base * 2**n))."""

    base_s: float = 0.2
    cap_s: float = 5.0
    rng: Callable[[], float] = random.random
    _attempt: int = 0

    def next_delay(self) -> float:
        ceiling = min(self.cap_s, self.base_s * (2 ** min(self._attempt, 30)))
        self._attempt += 1
        # Keep a small floor so a tight failure loop can never spin.
        return float(max(self.base_s / 4, ceiling * self.rng()))

    def reset(self) -> None:
        self._attempt = 0


_status_decoder = msgspec.json.Decoder(Status)
_list_decoder = msgspec.json.Decoder(RawList)
_event_decoder = msgspec.json.Decoder(RawWatchEvent)


def _api_error(status: int, body: bytes) -> ApiError:
    try:
        st = _status_decoder.decode(body)
        return ApiError(status, st.reason, st.message)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return ApiError(status, "", body[:200].decode("utf-8", "replace"))


class KubeClient:
    """Async client for the handful of calls pdroute needs. Use as an async context
    manager or call :meth:`close`."""

    def __init__(
        self,
        config: KubeConfig,
        *,
        request_timeout_s: float = 10.0,
        max_event_bytes: int = 8 << 20,
    ) -> None:
        self.config = config
        self._server = config.server.rstrip("/")
        self._request_timeout_s = request_timeout_s
        self._max_event_bytes = max_event_bytes
        self._session: aiohttp.ClientSession | None = None
        self._token: str | None = config.token
        self._token_read_at = -1e18
        if config.server.startswith("https://"):
            if config.insecure_skip_tls_verify:
                self._ssl: ssl.SSLContext | bool = False
            else:
                self._ssl = ssl.create_default_context(cafile=config.ca_file)
        else:
            self._ssl = False

    async def __aenter__(self) -> KubeClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=self._ssl, limit=32),
                # Kubernetes speaks JSON; we never want content-encoding surprises.
                auto_decompress=True,
            )
        return self._session

    def _headers(self, content_type: str | None = None) -> dict[str, str]:
        h = {"Accept": "application/json"}
        if self.config.token_file:
            now = time.monotonic()
            if now - self._token_read_at > _TOKEN_REREAD_S:
                try:
                    self._token = Path(self.config.token_file).read_text().strip()
                except OSError as e:
                    raise KubeConfigError(
                        f"cannot read token file {self.config.token_file}: {e}"
                    ) from e
                self._token_read_at = now
        if self._token:
            h["Authorization"] = f"Bearer {self._token}"
        if content_type:
            h["Content-Type"] = content_type
        return h

    async def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        body: bytes | None = None,
        content_type: str = "application/json",
    ) -> bytes:
        """One request; returns the body of a 2xx answer."""
        timeout = aiohttp.ClientTimeout(total=self._request_timeout_s)
        try:
            async with self._get_session().request(
                method,
                self._server + path,
                params=params,
                data=body,
                headers=self._headers(content_type if body is not None else None),
                timeout=timeout,
            ) as resp:
                data = await resp.read()
                if resp.status >= 300:
                    raise _api_error(resp.status, data)
                return data
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            raise KubeUnavailable(f"{method} {path}: {type(e).__name__}: {e}") from e

    async def get(self, path: str, type_: type[T]) -> T:
        return msgspec.json.decode(await self.request("GET", path), type=type_)

    async def create(self, path: str, obj: Any, type_: type[T]) -> T:
        data = await self.request("POST", path, body=msgspec.json.encode(obj))
        return msgspec.json.decode(data, type=type_)

    async def replace(self, path: str, obj: Any, type_: type[T]) -> T:
        data = await self.request("PUT", path, body=msgspec.json.encode(obj))
        return msgspec.json.decode(data, type=type_)

    async def delete(self, path: str) -> None:
        await self.request("DELETE", path)

    async def list(
        self,
        path: str,
        type_: type[T],
        *,
        label_selector: str | None = None,
        field_selector: str | None = None,
    ) -> tuple[list[T], str]:
        """All objects at a collection path and the list's resourceVersion.

        The list is unpaginated (no ``limit``), so it is one consistent snapshot.
        """
        params = _selector_params(label_selector, field_selector)
        raw = _list_decoder.decode(await self.request("GET", path, params=params))
        items = [msgspec.json.decode(r, type=type_) for r in raw.items or ()]
        return items, raw.metadata.resource_version

    async def watch(
        self,
        path: str,
        *,
        resource_version: str,
        label_selector: str | None = None,
        field_selector: str | None = None,
        timeout_s: int = 300,
        on_open: Callable[[], None] | None = None,
    ) -> AsyncIterator[RawWatchEvent]:
        """Stream watch events (``type``, raw ``object``) from ``resource_version``.

        Ends normally when the server closes the watch (after ``timeout_s``); raises
        :class:`KubeUnavailable` on a broken connection and :class:`ApiError` on an
        error status. ERROR events are yielded as they are (the caller decodes the
        Status; code 410 means relist).
        """
        params = _selector_params(label_selector, field_selector)
        params.update(
            {
                "watch": "true",
                "resourceVersion": resource_version,
                "allowWatchBookmarks": "true",
                "timeoutSeconds": str(timeout_s),
            }
        )
        # No total timeout; a read timeout a bit above the server's bookmark cadence
        # (~1 min) and the watch timeout detects a silently dead connection.
        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=self._request_timeout_s, sock_read=timeout_s + 30
        )
        try:
            async with self._get_session().get(
                self._server + path, params=params, headers=self._headers(), timeout=timeout
            ) as resp:
                if resp.status >= 300:
                    raise _api_error(resp.status, await resp.read())
                if on_open is not None:
                    on_open()
                buf = bytearray()
                async for chunk in resp.content.iter_any():
                    buf += chunk
                    while True:
                        nl = buf.find(b"\n")
                        if nl < 0:
                            break
                        line = bytes(buf[:nl])
                        del buf[: nl + 1]
                        if line.strip():
                            yield _decode_event(line)
                    if len(buf) > self._max_event_bytes:
                        raise KubeUnavailable(
                            f"watch {path}: event larger than {self._max_event_bytes} bytes"
                        )
                if buf.strip():
                    yield _decode_event(bytes(buf))
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            raise KubeUnavailable(f"watch {path}: {type(e).__name__}: {e}") from e


def _decode_event(line: bytes) -> RawWatchEvent:
    try:
        return _event_decoder.decode(line)
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        raise KubeUnavailable(f"malformed watch event: {e}") from e


def _selector_params(label_selector: str | None, field_selector: str | None) -> dict[str, str]:
    params: dict[str, str] = {}
    if label_selector:
        params["labelSelector"] = label_selector
    if field_selector:
        params["fieldSelector"] = field_selector
    return params


def decode_status(raw: msgspec.Raw) -> Status:
    """The Status carried by a watch ERROR event."""
    try:
        return msgspec.json.decode(raw, type=Status)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return Status(code=500, reason="Unknown", message="undecodable ERROR event")
