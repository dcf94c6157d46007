"""Informer resume/relist logic against a scripted client (the real API server is in
tests/integration/kube)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pytest

from pdroute.kube.client import ApiError, Backoff, KubeUnavailable
from pdroute.kube.informer import Informer
from pdroute.kube.types import Pod, RawWatchEvent


def raw_pod(name: str, rv: str) -> msgspec.Raw:
    return msgspec.Raw(
        msgspec.json.encode({"metadata": {"name": name, "namespace": "ns", "resourceVersion": rv}})
    )


def ev(kind: str, name: str, rv: str) -> RawWatchEvent:
    return RawWatchEvent(type=kind, object=raw_pod(name, rv))


def gone() -> RawWatchEvent:
    return RawWatchEvent(
        type="ERROR",
        object=msgspec.Raw(b'{"kind":"Status","code":410,"reason":"Expired","message":"too old"}'),
    )


class ScriptedClient:
    """``lists``: successive LIST answers; ``watches``: successive watch scripts, each a
    list of events and/or an exception to raise at that point."""

    def __init__(self, lists: list[tuple[list[str], str]], watches: list[list[Any]]) -> None:
        self.lists = lists
        self.watches = watches
        self.watch_rvs: list[str] = []
        self.done = asyncio.Event()

    async def list(self, path: str, type_: type[Pod], **kw: Any) -> tuple[list[Pod], str]:
        names, rv = self.lists.pop(0)
        items = [msgspec.json.decode(raw_pod(n, rv), type=Pod) for n in names]
        return items, rv

    async def watch(
        self, path: str, *, resource_version: str, **kw: Any
    ) -> AsyncIterator[RawWatchEvent]:
        self.watch_rvs.append(resource_version)
        if not self.watches:
            self.done.set()
            await asyncio.Event().wait()
        on_open = kw.get("on_open")
        if on_open is not None:
            on_open()
        for item in self.watches.pop(0):
            if isinstance(item, BaseException):
                raise item
            yield item


async def run_until_done(client: ScriptedClient) -> Informer[Pod]:
    changes: list[int] = []
    inf = Informer(
        client,  # type: ignore[arg-type]
        "/api/v1/namespaces/ns/pods",
        Pod,
        on_change=lambda: changes.append(1),
        backoff=Backoff(base_s=0.001, cap_s=0.001),
        sleep=lambda s: asyncio.sleep(0),
    )
    task = asyncio.create_task(inf.run())
    await asyncio.wait_for(client.done.wait(), 2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert changes, "on_change never called"
    return inf


async def test_resume_from_last_resource_version_after_disconnect() -> None:
    client = ScriptedClient(
        lists=[(["a"], "10")],
        watches=[
            [
                ev("ADDED", "b", "11"),
                RawWatchEvent("BOOKMARK", raw_pod("", "15")),
                KubeUnavailable("reset"),
            ],
            [ev("DELETED", "a", "16"), ev("MODIFIED", "b", "17")],
        ],
    )
    inf = await run_until_done(client)
    assert client.watch_rvs == ["10", "15", "17"]  # resumed, never relisted
    assert inf.lists == 1
    assert sorted(inf.store) == ["ns/b"]
    assert inf.store["ns/b"].metadata.resource_version == "17"


@pytest.mark.parametrize("how", ["event", "status"])
async def test_410_relists_and_replaces_the_store(how: str) -> None:
    expired: Any = gone() if how == "event" else ApiError(410, "Expired", "too old")
    client = ScriptedClient(
        # a, b, c known; during the gap b was deleted and d added.
        lists=[(["a", "b", "c"], "10"), (["a", "c", "d"], "50")],
        watches=[[KubeUnavailable("apiserver restarting")], [expired], []],
    )
    inf = await run_until_done(client)
    assert inf.lists == 2
    assert sorted(inf.store) == ["ns/a", "ns/c", "ns/d"]  # none lost, none duplicated
    assert client.watch_rvs[-1] == "50"


async def test_other_error_event_backs_off_and_resumes() -> None:
    err = RawWatchEvent(
        type="ERROR", object=msgspec.Raw(b'{"code":500,"reason":"InternalError","message":"x"}')
    )
    client = ScriptedClient(lists=[([], "1")], watches=[[err], [ev("ADDED", "a", "2")]])
    inf = await run_until_done(client)
    assert inf.errors == 1 and inf.lists == 1
    assert list(inf.store) == ["ns/a"]


def test_backoff_is_jittered_capped_and_resets() -> None:
    seq = iter([1.0, 1.0, 1.0, 1.0, 0.5, 1.0])
    b = Backoff(base_s=0.2, cap_s=1.0, rng=lambda: next(seq))
    assert [round(b.next_delay(), 3) for _ in range(4)] == [0.2, 0.4, 0.8, 1.0]
    assert b.next_delay() == 0.5  # jitter scales the capped ceiling
    b.reset()
    assert b.next_delay() == 0.2


async def test_undecodable_object_relists_instead_of_crashing() -> None:
    bad = RawWatchEvent(type="ADDED", object=msgspec.Raw(b'{"metadata":{"name":7}}'))
    client = ScriptedClient(
        lists=[(["a"], "1"), (["a", "b"], "5")],
        watches=[[bad], [ev("ADDED", "c", "6")]],
    )
    inf = await run_until_done(client)
    assert inf.errors == 1 and inf.lists == 2
    assert sorted(inf.store) == ["ns/a", "ns/b", "ns/c"]
