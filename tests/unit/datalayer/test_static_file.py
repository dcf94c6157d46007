"""StaticFileSource: parsing, validation errors naming file + key, reload semantics."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from epp.datalayer.static_file import (
    EndpointFileError,
    StaticFileSource,
    _read_file,
    load_endpoints_file,
)
from epp.datastore import Datastore

EXAMPLE = Path(__file__).resolve().parents[3] / "epp" / "datalayer" / "endpoints-example.yaml"


def _load(text: str) -> tuple[object, ...]:
    return load_endpoints_file("f.yaml", text.encode())


def test_example_file_parses() -> None:
    eps = load_endpoints_file(str(EXAMPLE), EXAMPLE.read_bytes())
    by_name = {e.name: e for e in eps}
    assert set(by_name) == {
        "decode-0",
        "prefill-0",
        "prefill-dp-rank-0",
        "prefill-dp-rank-1",
        "sglang-0",
    }
    d = by_name["decode-0"]
    assert d.key == "10.0.0.11:8000"
    assert d.metrics_host_port == "10.0.0.11:8200"
    assert d.role == "decode"
    assert by_name["prefill-0"].metrics_host_port == "10.0.0.12:8000"
    assert by_name["prefill-dp-rank-1"].key == "10.0.0.13:8001"
    assert by_name["prefill-dp-rank-1"].role == "prefill"
    assert by_name["sglang-0"].engine == "sglang"


def test_bare_list_ipv6_and_metrics_ports() -> None:
    (a, b) = _load(
        """
- name: x
  address: "fd00::1"
  ports: [8000, 8001]
  metricsPorts: [9000, 9001]
  metricsAddress: "fd00::2"
  labels: {llm-d.ai/role: decode, flag: true}
"""
    )
    assert a.key == "[fd00::1]:8000"  # type: ignore[attr-defined]
    assert b.metrics_host_port == "[fd00::2]:9001"  # type: ignore[attr-defined]
    assert a.labels["flag"] == "true"  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("text", "key", "fragment"),
    [
        ("endpoints: [{address: a}]", "endpoints[0].port", "missing"),
        ("endpoints: [{address: a, port: 70000}]", "endpoints[0].port", "out of range"),
        ("endpoints: [{address: a, port: '80'}]", "endpoints[0].port", "integer"),
        ("endpoints: [{port: 80}]", "endpoints[0].address", "non-empty string"),
        ("endpoints: [{address: a, port: 1, labes: {}}]", "endpoints[0].labes", "unknown key"),
        ("endpoints: [{address: a, ports: []}]", "endpoints[0].ports", "non-empty list"),
        ("endpoints: [{address: a, ports: [1, x]}]", "endpoints[0].ports[1]", "integer"),
        ("endpoints: [{address: a, port: 1, ports: [2]}]", "endpoints[0].ports", "not both"),
        (
            "endpoints: [{address: a, ports: [1, 2], metricsPort: 3}]",
            "endpoints[0].metricsPort",
            "metricsPorts",
        ),
        (
            "endpoints: [{address: a, ports: [1, 2], metricsPorts: [3]}]",
            "endpoints[0].metricsPorts",
            "one port per",
        ),
        ("endpoints: [{address: a, port: 1, labels: [x]}]", "endpoints[0].labels", "mapping"),
        ("endpoints: [{address: a, port: 1, labels: {k: [1]}}]", "endpoints[0].labels.k", "scalar"),
        (
            "endpoints: [{address: a, port: 1}, {address: a, port: 1}]",
            "endpoints[1]",
            "duplicate endpoint a:1",
        ),
        ("endpoints: [7]", "endpoints[0]", "mapping"),
        ("endpoints: {a: 1}", "endpoints", "list"),
        ("endpoint: []", "endpoint", "unknown top-level"),
        ("endpoints: [\n  {address: a, port: 1\n", "line", "not valid YAML"),
    ],
)
def test_errors_name_file_and_key(text: str, key: str, fragment: str) -> None:
    with pytest.raises(EndpointFileError) as ei:
        _load(text)
    assert ei.value.path == "f.yaml"
    assert ei.value.key.startswith(key)
    assert fragment in str(ei.value)
    assert str(ei.value).startswith("f.yaml: ")


def test_empty_file_is_empty_set() -> None:
    assert _load("") == ()
    assert _load("endpoints: []") == ()


class _Ticks:
    """Injected sleep: each call blocks until the test releases one tick."""

    def __init__(self) -> None:
        self.sem = asyncio.Semaphore(0)
        self.calls = 0
        self.cond = asyncio.Condition()

    async def sleep(self, _s: float) -> None:
        async with self.cond:
            self.calls += 1
            self.cond.notify_all()
        await self.sem.acquire()

    async def wait_calls(self, n: int) -> None:
        async with asyncio.timeout(2.0), self.cond:
            await self.cond.wait_for(lambda: self.calls >= n)


def _overwrite_in_place(p: Path, data: bytes) -> None:
    with open(p, "r+b") as f:
        f.write(data)


def _write(path: Path, text: str, *, mtime_ns: int | None = None) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    if mtime_ns is not None:
        os.utime(path, ns=(mtime_ns, mtime_ns))


async def test_startup_error_is_fatal(tmp_path: Path) -> None:
    p = tmp_path / "eps.yaml"
    p.write_text("endpoints: [{address: a}]")
    src = StaticFileSource(str(p))
    ds = Datastore()
    with pytest.raises(EndpointFileError, match=r"eps.yaml: endpoints\[0\].port"):
        await src.run(ds)
    assert not src.ready() and not ds.synced
    with pytest.raises(EndpointFileError, match="cannot read"):
        await StaticFileSource(str(tmp_path / "missing.yaml")).run(ds)


async def test_reload_replaces_and_bad_reload_keeps_previous(tmp_path: Path) -> None:
    p = tmp_path / "eps.yaml"
    _write(p, "endpoints: [{address: 10.0.0.1, port: 8000}]")
    ticks = _Ticks()
    src = StaticFileSource(str(p), poll_interval_s=0.5, sleep=ticks.sleep)
    ds = Datastore()
    removed: list[str] = []
    ds.on_endpoint_removed(removed.append)
    task = asyncio.create_task(src.run(ds))
    try:
        await ticks.wait_calls(1)
        assert src.ready() and [e.key for e in ds.endpoints()] == ["10.0.0.1:8000"]

        # Unchanged file: no reload.
        ticks.sem.release()
        await ticks.wait_calls(2)
        assert src.loads == 1

        # Changed file: new set, removal notified.
        _write(p, "endpoints: [{address: 10.0.0.2, ports: [8000, 8001]}]")
        ticks.sem.release()
        await ticks.wait_calls(3)
        assert sorted(e.key for e in ds.endpoints()) == ["10.0.0.2:8000", "10.0.0.2:8001"]
        assert removed == ["10.0.0.1:8000"]
        assert src.loads == 2 and src.last_error is None

        # Bad edit: logged, previous set kept.
        _write(p, "endpoints: [{address: 10.0.0.3, port: nope}]")
        ticks.sem.release()
        await ticks.wait_calls(4)
        assert sorted(e.key for e in ds.endpoints()) == ["10.0.0.2:8000", "10.0.0.2:8001"]
        assert src.last_error is not None and "endpoints[0].port" in src.last_error

        # File deleted: kept as well.
        p.unlink()
        ticks.sem.release()
        await ticks.wait_calls(5)
        assert len(ds.endpoints()) == 2 and "cannot read" in (src.last_error or "")

        # Fixed: replaced again.
        _write(p, "endpoints: [{address: 10.0.0.4, port: 1}]")
        ticks.sem.release()
        await ticks.wait_calls(6)
        assert [e.key for e in ds.endpoints()] == ["10.0.0.4:1"]
        assert src.last_error is None
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_same_size_same_mtime_rewrite_is_caught_by_hash(tmp_path: Path) -> None:
    """A rewrite that keeps size and mtime (coarse timestamps) is still detected
    while the mtime is recent (racy window) because the content hash differs."""
    p = tmp_path / "eps.yaml"
    _write(p, "endpoints: [{address: 10.0.0.1, port: 8000}]")
    src = StaticFileSource(str(p))
    ds = Datastore()
    src._remember(*_read_file(str(p)))  # as if run() had loaded it
    ds.replace_endpoints(src.load())
    st = p.stat()
    _overwrite_in_place(p, b"endpoints: [{address: 10.0.0.9, port: 8000}]")  # same inode+size
    os.utime(p, ns=(st.st_mtime_ns, st.st_mtime_ns))
    assert p.stat().st_ino == st.st_ino
    assert p.stat().st_size == st.st_size
    assert await src.poll_once(ds)
    assert [e.key for e in ds.endpoints()] == ["10.0.0.9:8000"]


async def test_old_unchanged_stat_skips_read(tmp_path: Path) -> None:
    p = tmp_path / "eps.yaml"
    _write(p, "endpoints: [{address: 10.0.0.1, port: 8000}]", mtime_ns=1_000_000_000)
    src = StaticFileSource(str(p))
    ds = Datastore()
    src._remember(*_read_file(str(p)))
    # Rewrite in place keeping inode, size and the (old) mtime: the stat is unchanged
    # and outside the racy window, so the poll does not read the file.
    _overwrite_in_place(p, b"endpoints: [{address: 10.0.0.2, port: 8000}]")
    os.utime(p, ns=(1_000_000_000, 1_000_000_000))
    assert not await src.poll_once(ds)
    assert ds.endpoints() == []


async def test_parsing_runs_off_the_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """YAML parsing of a (possibly large) file must not block the event loop."""
    import threading

    import epp.datalayer.static_file as sf

    threads: list[int] = []
    real = sf.load_endpoints_file

    def spy(path: str, data: bytes) -> tuple[object, ...]:
        threads.append(threading.get_ident())
        return real(path, data)

    monkeypatch.setattr(sf, "load_endpoints_file", spy)
    p = tmp_path / "eps.yaml"
    _write(p, "endpoints: [{address: 10.0.0.1, port: 8000}]", mtime_ns=1_000_000_000)
    loaded = asyncio.Event()

    async def park(_s: float) -> None:  # run() sleeps after its first load
        loaded.set()
        await asyncio.Event().wait()

    src = StaticFileSource(str(p), sleep=park)
    ds = Datastore()
    task = asyncio.create_task(src.run(ds))
    await loaded.wait()
    _write(p, "endpoints: [{address: 10.0.0.2, port: 8000}, {address: 10.0.0.3, port: 8000}]")
    assert await src.poll_once(ds)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    loop_thread = threading.get_ident()
    assert len(threads) == 2 and loop_thread not in threads
