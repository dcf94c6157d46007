"""``pdroute bench`` end to end on a tiny workload: real simulators, real Envoy, the
real EPP (and vllm-router from PyPI); structure and counting, never timings."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

from pdroute.bench import cmd
from pdroute.bench.arms import PEERS, ensure_peer
from pdroute.bench.report import write_report

FIXTURE = Path(__file__).parents[2] / "unit" / "bench" / "fixtures" / "results-small.json"
TINY = [
    "--workload",
    "shared-prefix",
    "--profile",
    "fast",
    "--decode",
    "2",
    "--duration",
    "2",
    "--rate",
    "8",
    "--groups",
    "3",
    "--system-tokens",
    "120",
    "--output-tokens",
    "4",
]


def bench(
    out: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "pdroute.cli", "bench", "run", *TINY, "--out", str(out), *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=240,
        env=full_env,
    )


def _plan_len(out: Path) -> int:
    return len(orjson.loads((out / "plans" / "shared-prefix.json").read_bytes()))


@pytest.mark.envoy
def test_pdroute_and_round_robin_end_to_end(tmp_path: Path, envoy_binary: str) -> None:
    out = tmp_path / "res"
    r = bench(out, "--arms", "pdroute,round-robin", env={"PDROUTE_ENVOY": envoy_binary})
    assert r.returncode == 0, r.stderr[-3000:]
    res: dict[str, Any] = orjson.loads((out / "results.json").read_bytes())
    n = _plan_len(out)
    assert n > 5
    wl = res["workloads"]["shared-prefix"]
    assert wl["shape"]["requests"] == n
    assert list(wl["arms"]) == ["pdroute", "round-robin"]
    for name, arm in wl["arms"].items():
        assert arm["status"] == "ok", (name, arm)
        s = arm["summary"]
        assert s["requests"] == n and s["succeeded"] == n and s["errors"] == {}
        assert s["output_tokens"] == 4 * n
        assert s["ttft_s"]["p50"] is not None and s["itl_s"]["p50"] is not None
        # Every request was counted by exactly one decode server (probe excluded).
        assert sum(s["per_endpoint"].values()) == n
        assert len(s["per_endpoint"]) == 2
        assert sum(s["per_endpoint_header"].values()) == n
        assert arm["prefix_cache"]["queries"] > 0
        assert arm["prefix_cache"]["hits"] > 0  # 3 groups, 2 servers: prefixes repeat
        assert arm["router_cpu_s"]["total"] >= 0 and "envoy" in arm["router_cpu_s"]
        recs = orjson.loads((out / arm["records_file"]).read_bytes())
        assert [x["idx"] for x in recs] == list(range(n))
        assert all(x["status"] == 200 and x["ok"] for x in recs)
    assert "epp" in wl["arms"]["pdroute"]["router_cpu_s"]
    # Round robin alternates: 2 servers differ by at most one request.
    rr = list(wl["arms"]["round-robin"]["summary"]["per_endpoint"].values())
    assert abs(rr[0] - rr[1]) <= 1
    md = (out / "results.md").read_text()
    assert "| pdroute |" in md and "| round-robin |" in md
    assert (out / "plots" / "shared-prefix.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.envoy
def test_an_arm_that_cannot_start_is_recorded_as_failed(tmp_path: Path) -> None:
    out = tmp_path / "res"
    r = bench(out, "--arms", "round-robin", env={"PDROUTE_ENVOY": str(tmp_path / "no-envoy")})
    assert r.returncode == 0, r.stderr[-3000:]
    res = orjson.loads((out / "results.json").read_bytes())
    arm = res["workloads"]["shared-prefix"]["arms"]["round-robin"]
    assert arm["status"] == "failed" and "Envoy not found" in arm["reason"]
    assert "| round-robin | **failed**: Envoy not found" in (out / "results.md").read_text()


def test_vllm_router_round_robin(tmp_path: Path) -> None:
    """The peer arm: vllm-router from PyPI in its own env (installed on first use,
    ~10 s; scripts/bootstrap installs it when PDROUTE_FULL=1)."""
    try:
        ensure_peer("vllm-router-rr")
    except Exception as e:
        pytest.fail(f"cannot install {PEERS['vllm-router-rr'][0]}: {e}")
    out = tmp_path / "res"
    r = bench(out, "--arms", "vllm-router-rr")
    assert r.returncode == 0, r.stderr[-3000:]
    res = orjson.loads((out / "results.json").read_bytes())
    arm = res["workloads"]["shared-prefix"]["arms"]["vllm-router-rr"]
    assert arm["status"] == "ok", arm
    n = _plan_len(out)
    assert arm["summary"]["succeeded"] == n
    assert sum(arm["summary"]["per_endpoint"].values()) == n
    assert "vllm-router-rr" in arm["router_cpu_s"]


def test_plots_and_docs_page(tmp_path: Path) -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        pytest.fail("matplotlib missing: run scripts/bootstrap (installs .[dev,bench])")
    results = orjson.loads(FIXTURE.read_bytes())
    md_path, plots = write_report(results, tmp_path / "docs" / "b.md", tmp_path / "docs" / "b")
    assert set(plots) == {"shared-prefix", "ramp"}
    for p in plots.values():
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = md_path.read_text()
    assert "![shared-prefix](b/shared-prefix.png)" in text
    assert "![ramp](b/ramp.png)" in text


def test_report_command(tmp_path: Path) -> None:
    out = tmp_path / "res"
    out.mkdir()
    (out / "results.json").write_bytes(FIXTURE.read_bytes())
    docs = tmp_path / "benchmarks.md"
    rc = cmd.run(argparse.Namespace(bench_cmd="report", results=out, docs=docs))
    assert rc == 0
    assert "| pdroute | 60 / 100 / 300 |" in docs.read_text()
    assert (tmp_path / "benchmarks" / "shared-prefix.png").exists()
