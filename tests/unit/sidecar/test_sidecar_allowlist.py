"""SSRF allowlist: host:port parsing, the endpoint file format, live reload."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from vllm_sidecar.allowlist import (
    AllowlistError,
    MembersAllowlist,
    StaticFileAllowlist,
    normalize_host_port,
    parse_endpoints_file,
)

REPO = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize(
    ("raw", "want"),
    [
        ("10.0.0.1:8000", "10.0.0.1:8000"),
        (" Prefill-0.NS.svc:8000 ", "prefill-0.ns.svc:8000"),
        ("[fd00::1]:8000", "[fd00::1]:8000"),
        ("10.0.0.1:08000", "10.0.0.1:8000"),
        ("10.0.0.1", None),
        ("fd00::1:8000", None),
        ("http://10.0.0.1:8000", None),
        ("10.0.0.1:8000/x", None),
        ("user@10.0.0.1:8000", None),
        ("10.0.0.1:0", None),
        ("10.0.0.1:65536", None),
        ("10.0.0.1:-1", None),
        (":8000", None),
        ("[]:80", None),
        ("[::1]8000", None),
        ("", None),
    ],
)
def test_normalize_host_port(raw: str, want: str | None) -> None:
    assert normalize_host_port(raw) == want


def test_parse_same_format_as_epp() -> None:
    example = REPO / "epp" / "datalayer" / "endpoints-example.yaml"
    data = (
        example.read_bytes()
        if example.exists()
        else b"""
endpoints:
  - {name: decode-0, address: 10.0.0.11, port: 8000, metricsPort: 8200}
  - {name: prefill-0, address: 10.0.0.12, port: 8000}
  - {name: prefill-dp, address: 10.0.0.13, ports: [8000, 8001]}
  - {name: sglang-0, address: 10.0.0.14, port: 30000, engine: sglang}
"""
    )
    members = parse_endpoints_file("f.yaml", data)
    assert {
        "10.0.0.11:8000",
        "10.0.0.12:8000",
        "10.0.0.13:8000",
        "10.0.0.13:8001",
        "10.0.0.14:30000",
    } <= members
    assert "10.0.0.11:8200" not in members  # metrics ports are not prefill targets


def test_parse_list_form_ipv6_and_empty() -> None:
    assert parse_endpoints_file("f", b"- {address: 'fd00::2', port: 80}") == {"[fd00::2]:80"}
    assert parse_endpoints_file("f", b"endpoints: []") == frozenset()
    assert parse_endpoints_file("f", b"") == frozenset()


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        (b"endpoints: {a: 1}", "endpoints: must be a list"),
        (b"endpoints: [x]", "endpoints[0]: must be a mapping"),
        (b"endpoints: [{port: 1}]", "endpoints[0].address"),
        (b"endpoints: [{address: a}]", "endpoints[0].port: missing"),
        (b"endpoints: [{address: a, port: 'x'}]", "endpoints[0].port: must be a port"),
        (b"endpoints: [{address: a, ports: [1, 70000]}]", "endpoints[0].ports[1]"),
        (b"endpoints: [{address: a, ports: []}]", "endpoints[0].ports"),
        (b"endpoints: [{address: a, port: true}]", "endpoints[0].port"),
        (b"endpoints: [: :", "not valid YAML"),
    ],
)
def test_parse_errors_name_file_and_key(data: bytes, needle: str) -> None:
    with pytest.raises(AllowlistError) as e:
        parse_endpoints_file("/etc/pool.yaml", data)
    assert str(e.value).startswith("/etc/pool.yaml: ")
    assert needle in str(e.value)


async def test_static_file_reload(tmp_path: Path) -> None:
    f = tmp_path / "eps.yaml"
    f.write_text("endpoints: [{address: 127.0.0.1, port: 9001}]\n")
    allow = StaticFileAllowlist(f, poll_interval_s=0.01)
    assert allow.allows("127.0.0.1:9001")
    assert not allow.allows("127.0.0.1:9002")
    assert await allow.reload_once() is False  # unchanged

    f.write_text("endpoints: [{address: 127.0.0.1, port: 9002}, {address: h, port: 1}]\n")
    os.utime(f, ns=(1, 10**18))  # a distinct mtime even on coarse filesystems
    assert await allow.reload_once() is True
    assert allow.allows("127.0.0.1:9002") and not allow.allows("127.0.0.1:9001")

    f.write_text("endpoints: [{address: 127.0.0.1}]\n")  # bad edit: keep the previous set
    os.utime(f, ns=(1, 2 * 10**18))
    assert await allow.reload_once() is False
    assert allow.allows("127.0.0.1:9002")

    f.unlink()  # gone: keep the previous set
    assert await allow.reload_once() is False
    assert allow.members == {"127.0.0.1:9002", "h:1"}


def test_static_file_missing_or_bad_at_start(tmp_path: Path) -> None:
    with pytest.raises(AllowlistError, match="cannot read endpoint file"):
        StaticFileAllowlist(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("endpoints: [{address: x, port: 0}]")
    with pytest.raises(AllowlistError, match=r"endpoints\[0\]\.port"):
        StaticFileAllowlist(bad)


async def test_members_allowlist_is_live() -> None:
    current: set[str] = {"10.0.0.1:8000"}
    ran = []

    async def runner() -> None:
        ran.append(True)

    allow = MembersAllowlist(lambda: current, runner)
    assert allow.allows("10.0.0.1:8000")
    current.clear()
    assert not allow.allows("10.0.0.1:8000")
    await allow.run()
    assert ran == [True]
