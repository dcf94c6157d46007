"""Lease-based leader election (coordination.k8s.io/v1 Lease), client-go semantics.

Rules (``lease_duration`` > ``renew_deadline`` > ``retry_period``):
- Every ``retry_period`` each candidate reads the Lease. A candidate may take it when
  it is unheld (no holder, or ``holderIdentity`` empty after a release) or when the
  holder's record has not changed for ``lease_duration`` *as observed on our own
  clock* (client-go's rule: we never compare our clock with the holder's
  ``renewTime``, so clock skew between nodes is harmless).
- Writes are optimistic: an update carries the resourceVersion we read, so two
  candidates racing for an expired lease cannot both win (one gets 409 Conflict).
- The leader renews every ``retry_period``; if no renewal succeeded for
  ``renew_deadline`` it steps down (``is_leader`` False) before anyone else can take
  the lease (which needs ``lease_duration`` > ``renew_deadline`` of silence).
- On orderly shutdown :meth:`release` empties ``holderIdentity`` so a successor takes
  over at its next retry instead of waiting for expiry.

API server outage: with ``keep_leading_while_unreachable`` (the EPP's default) a
leader whose renewals fail *only because the API server does not answer* keeps
leading. Nobody can take the lease while the API server is down, so this cannot
create a second leader unless the leader alone is partitioned from a working API
server; then a successor takes over after ``lease_duration`` and the old leader steps
down at its first successful read (two leaders for the partition's duration). For an
active-passive EPP that trade is right: two routing replicas are harmless, zero
replicas (strict client-go behaviour: everyone steps down after ``renew_deadline``)
stop all traffic for the whole outage.

Failover after a leader dies without releasing: at most ``lease_duration +
retry_period`` (plus one request) after its last renewal.

The decision logic lives in :meth:`LeaderElector.tick` (one attempt, returns the delay
to the next); it takes an injectable monotonic clock and a :class:`LeaseStore`, so it
is tested in virtual time without an API server.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import msgspec

from pdroute.kube.client import ApiError, KubeClient, KubeError, KubeUnavailable
from pdroute.kube.types import Lease, LeaseSpec, ObjectMeta

log = logging.getLogger(__name__)


class LeaseConflict(Exception):
    """Someone else wrote the Lease since we read it (HTTP 409)."""


class LeaseStore(Protocol):
    async def get(self) -> Lease | None: ...
    async def create(self, lease: Lease) -> Lease: ...
    async def update(self, lease: Lease) -> Lease: ...


class KubeLeaseStore:
    """The Lease ``namespace/name`` in the API server."""

    def __init__(self, client: KubeClient, namespace: str, name: str) -> None:
        self._client = client
        self.namespace = namespace
        self.name = name
        self._coll = f"/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases"

    async def get(self) -> Lease | None:
        try:
            return await self._client.get(f"{self._coll}/{self.name}", Lease)
        except ApiError as e:
            if e.not_found:
                return None
            raise

    async def create(self, lease: Lease) -> Lease:
        try:
            return await self._client.create(self._coll, lease, Lease)
        except ApiError as e:
            if e.conflict or e.status == 409:
                raise LeaseConflict(str(e)) from e
            raise

    async def update(self, lease: Lease) -> Lease:
        try:
            return await self._client.replace(f"{self._coll}/{self.name}", lease, Lease)
        except ApiError as e:
            if e.conflict:
                raise LeaseConflict(str(e)) from e
            raise


def _micro_time(wall: float) -> str:
    return dt.datetime.fromtimestamp(wall, tz=dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%f") + "Z"


@dataclass(frozen=True, slots=True)
class ElectionConfig:
    lease_duration_s: float = 15.0
    renew_deadline_s: float = 10.0
    retry_period_s: float = 2.0
    #: When renewals fail only because the API server is unreachable, keep leading
    #: (see the module docstring). False = strict client-go behaviour.
    keep_leading_while_unreachable: bool = False

    def __post_init__(self) -> None:
        if not self.lease_duration_s > self.renew_deadline_s > self.retry_period_s > 0:
            raise ValueError(
                "leader election needs lease_duration > renew_deadline > retry_period > 0, got "
                f"{self.lease_duration_s}/{self.renew_deadline_s}/{self.retry_period_s}"
            )


class LeaderElector:
    """One candidate. ``is_leader`` is the answer; ``on_change(bool)`` hears flips."""

    def __init__(
        self,
        store: LeaseStore,
        identity: str,
        config: ElectionConfig | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        sleep: Callable[[float], object] = asyncio.sleep,
        on_change: Callable[[bool], None] | None = None,
    ) -> None:
        if not identity:
            raise ValueError("leader election identity must not be empty")
        self._store = store
        self.identity = identity
        self.config = config or ElectionConfig()
        self._clock = clock
        self._wall = wall_clock
        self._sleep = sleep
        self._on_change = on_change
        self.is_leader = False
        # Last record seen, and when (our clock) it last changed.
        self._observed: tuple[str, LeaseSpec] | None = None
        self._observed_at = 0.0
        self._last_renew = 0.0
        self.transitions = 0

    def _set_leader(self, value: bool) -> None:
        if value != self.is_leader:
            self.is_leader = value
            log.info("leader election %s: %s", self.identity, "LEADING" if value else "following")
            if self._on_change is not None:
                self._on_change(value)

    def _observe(self, lease: Lease) -> None:
        # Any write (a renewal bumps resourceVersion) restarts the expiry countdown.
        record = (lease.metadata.resource_version, lease.spec)
        if record != self._observed:
            self._observed = record
            self._observed_at = self._clock()

    async def tick(self) -> float:
        """One acquire-or-renew attempt; returns seconds until the next."""
        cfg = self.config
        now = self._clock()
        unreachable = False
        try:
            ok = await self._try_acquire_or_renew(now)
        except LeaseConflict:
            ok = False
        except KubeUnavailable as e:
            log.warning("leader election %s: %s", self.identity, e)
            ok, unreachable = False, True
        except KubeError as e:
            log.warning("leader election %s: %s", self.identity, e)
            ok = False
        if ok:
            self._last_renew = self._clock()
            self._set_leader(True)
        elif self.is_leader and self._clock() - self._last_renew >= cfg.renew_deadline_s:
            if unreachable and cfg.keep_leading_while_unreachable:
                log.warning(
                    "leader election %s: API server unreachable for %.1fs; still leading",
                    self.identity,
                    self._clock() - self._last_renew,
                )
            else:
                self._set_leader(False)
        return cfg.retry_period_s

    async def _try_acquire_or_renew(self, now: float) -> bool:
        cfg = self.config
        wall = _micro_time(self._wall())
        duration = max(1, round(cfg.lease_duration_s))
        lease = await self._store.get()
        if lease is None:
            spec = LeaseSpec(
                holder_identity=self.identity,
                lease_duration_seconds=duration,
                acquire_time=wall,
                renew_time=wall,
                lease_transitions=0,
            )
            created = await self._store.create(
                Lease(metadata=ObjectMeta(name=self._store_name()), spec=spec)
            )
            self._observe(created)
            return True
        self._observe(lease)
        holder = lease.spec.holder_identity or ""
        held_by_me = holder == self.identity
        if held_by_me and not self.is_leader and self._last_renew == 0.0:
            # A record with our name from a previous life of this identity: re-acquire.
            pass
        elif not held_by_me and holder:
            observed_duration = float(lease.spec.lease_duration_seconds or cfg.lease_duration_s)
            if now - self._observed_at < observed_duration:
                return False  # held by someone else and not expired
        transitions = lease.spec.lease_transitions or 0
        if not held_by_me:
            transitions += 1
        spec = LeaseSpec(
            holder_identity=self.identity,
            lease_duration_seconds=duration,
            acquire_time=lease.spec.acquire_time if held_by_me else wall,
            renew_time=wall,
            lease_transitions=transitions,
        )
        updated = await self._store.update(msgspec.structs.replace(lease, spec=spec))
        self._observe(updated)
        if not held_by_me:
            self.transitions += 1
        return True

    def _store_name(self) -> str:
        return str(getattr(self._store, "name", "lease"))

    async def release(self) -> None:
        """Give the lease up if we hold it (best effort)."""
        was_leader = self.is_leader
        self._set_leader(False)
        if not was_leader:
            return
        try:
            lease = await self._store.get()
            if lease is None or lease.spec.holder_identity != self.identity:
                return
            spec = msgspec.structs.replace(
                lease.spec,
                holder_identity="",
                lease_duration_seconds=1,
                renew_time=_micro_time(self._wall()),
            )
            await self._store.update(msgspec.structs.replace(lease, spec=spec))
        except (KubeError, LeaseConflict) as e:
            log.warning("leader election %s: release failed: %s", self.identity, e)

    async def run(self, *, release_on_cancel: bool = True) -> None:
        """Campaign until cancelled; releases the lease on cancellation."""
        try:
            while True:
                delay = await self.tick()
                await self._sleep(delay)  # type: ignore[misc]
        finally:
            if release_on_cancel:
                with contextlib.suppress(Exception):
                    await asyncio.shield(self.release())
