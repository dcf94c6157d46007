"""An informer: a local cache of one kind of object kept current by list + watch.

Invariant: ``store`` holds exactly the objects of the last consistent view the API
server gave us, keyed ``namespace/name``; one key never appears twice and a deleted
object never lingers past the next event or relist that reports it.

How it stays correct across failures:
- It starts with a full LIST (one snapshot, no pagination) and replaces ``store`` with
  it, then WATCHes from the list's resourceVersion with bookmarks on, recording the
  resourceVersion of every event (bookmarks included).
- When a watch ends or breaks (timeout, apiserver restart, network error) it resumes
  the watch from the last recorded resourceVersion, so nothing between is missed; the
  server replays what happened meanwhile.
- When the server says that resourceVersion is gone (HTTP 410, or an ERROR event
  with code 410) it relists; the relist *replaces* the store, so objects deleted
  during the gap disappear and nothing is duplicated.
- Retries use exponential backoff with full jitter; a successful connection resets
  it. During an outage the store keeps the last known state (``connected`` is False).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Generic, Protocol, TypeVar

import msgspec

from pdroute.kube.client import ApiError, Backoff, KubeClient, KubeUnavailable, decode_status
from pdroute.kube.types import ObjectMeta

log = logging.getLogger(__name__)


class _HasMeta(Protocol):
    @property
    def metadata(self) -> ObjectMeta: ...


T = TypeVar("T", bound=_HasMeta)


def object_key(meta: ObjectMeta) -> str:
    return f"{meta.namespace}/{meta.name}"


class _Gone(Exception):
    pass


class Informer(Generic[T]):
    """Keeps ``store`` in sync with the objects at ``path`` matching the selectors.

    ``on_change`` is called (synchronously, on the event loop) after every change to
    the store, including a relist; consumers coalesce (e.g. set an ``asyncio.Event``).
    """

    def __init__(
        self,
        client: KubeClient,
        path: str,
        type_: type[T],
        *,
        label_selector: str | None = None,
        field_selector: str | None = None,
        on_change: Callable[[], None] | None = None,
        backoff: Backoff | None = None,
        watch_timeout_s: int = 300,
        sleep: Callable[[float], object] = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
        name: str = "",
    ) -> None:
        self._client = client
        self.path = path
        self._type = type_
        self.label_selector = label_selector
        self.field_selector = field_selector
        self._on_change = on_change
        self._backoff = backoff or Backoff()
        self._watch_timeout_s = watch_timeout_s
        self._sleep = sleep
        self._clock = clock
        self.name = name or path
        self._decoder = msgspec.json.Decoder(type_)
        self.store: dict[str, T] = {}
        self.resource_version = ""
        self.has_synced = False
        #: True while a watch stream is established.
        self.connected = False
        #: Clock time of the last successful contact (list or watch event).
        self.last_contact = 0.0
        # Counters, for tests and metrics.
        self.lists = 0
        self.watches = 0
        self.errors = 0

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change()

    async def run(self) -> None:
        """List and watch until cancelled."""
        need_list = True
        while True:
            try:
                if need_list:
                    await self._list()
                    need_list = False
                started = self._clock()
                await self._watch()
                if self._clock() - started < 1.0:
                    # A watch that closes at once, repeatedly, must not spin.
                    await self._sleep(self._backoff.next_delay())  # type: ignore[misc]
            except _Gone:
                log.info(
                    "%s: resourceVersion %s expired; relisting", self.name, self.resource_version
                )
                need_list = True
                continue  # relist right away: the server is up
            except (KubeUnavailable, ApiError, msgspec.MsgspecError) as e:
                self.connected = False
                self.errors += 1
                if isinstance(e, msgspec.MsgspecError) or (isinstance(e, ApiError) and e.gone):
                    # An object we cannot decode: start over from a fresh list rather
                    # than skip an event (skipping could lose a deletion).
                    need_list = True
                delay = self._backoff.next_delay()
                log.warning("%s: %s; retrying in %.2fs", self.name, e, delay)
                await self._sleep(delay)  # type: ignore[misc]

    async def _list(self) -> None:
        items, rv = await self._client.list(
            self.path,
            self._type,
            label_selector=self.label_selector,
            field_selector=self.field_selector,
        )
        self.lists += 1
        self.last_contact = self._clock()
        self.store = {object_key(o.metadata): o for o in items}
        self.resource_version = rv
        self.has_synced = True
        self._changed()

    def _opened(self) -> None:
        self.connected = True
        self.last_contact = self._clock()
        self._backoff.reset()

    async def _watch(self) -> None:
        self.watches += 1
        events = self._client.watch(
            self.path,
            resource_version=self.resource_version,
            label_selector=self.label_selector,
            field_selector=self.field_selector,
            timeout_s=self._watch_timeout_s,
            on_open=self._opened,
        )
        async for ev in events:
            self.last_contact = self._clock()
            if ev.type == "ERROR":
                st = decode_status(ev.object)
                if st.code == 410:
                    raise _Gone()
                raise ApiError(st.code, st.reason, st.message)
            obj = self._decoder.decode(ev.object)
            meta = obj.metadata
            if meta.resource_version:
                self.resource_version = meta.resource_version
            if ev.type == "BOOKMARK":
                continue
            key = object_key(meta)
            if ev.type in ("ADDED", "MODIFIED"):
                self.store[key] = obj
            elif ev.type == "DELETED":
                self.store.pop(key, None)
            else:
                log.warning("%s: unknown watch event type %r", self.name, ev.type)
                continue
            self._changed()
        # The server closed the watch (timeout): resume from resource_version.
        self.connected = False
