"""Run workloads against arms and write the results directory.

For each workload, for each arm: start the arm (fresh fleet, cold caches), take a
snapshot of the model servers' counters and the routers' CPU time, run the load
generator as a separate process (:mod:`pdroute.bench.loadgen`) with the workload's
plan, take the second snapshot, stop the arm, summarise. An arm that fails to
install or start is recorded with ``status: failed`` and the reason.

Results directory layout::

    results.json            everything (config, environment, per-arm metrics)
    results.md              the markdown tables (same renderer as the docs page)
    plots/*.png             when matplotlib is importable
    plans/<workload>.json   the planned requests (identical for every arm)
    records/<workload>/<arm>.json   per-request records
    runs/<workload>/<arm>/  configs and logs of every process of the arm
"""

from __future__ import annotations

import asyncio
import datetime
import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from pdroute.bench.arms import PD_ARMS, Arm, ArmFailed, ArmInfo, cpu_seconds
from pdroute.bench.stats import (
    RequestRecord,
    Slo,
    hit_rate,
    parse_prometheus_sums,
    summarize,
)
from pdroute.bench.workloads import WorkloadSpec, describe, generate

COUNTERS = (
    "vllm:prefix_cache_queries_total",
    "vllm:prefix_cache_hits_total",
    "vllm:request_success_total",
    "vllm:prompt_tokens_total",
    "vllm:generation_tokens_total",
)


@dataclass
class RunConfig:
    workloads: list[WorkloadSpec]
    arms: list[str]
    out: Path
    slo: Slo = field(default_factory=Slo)
    model: str = "sim-model"
    concurrency: int = 512
    timeout_s: float = 300.0
    quick: bool = False
    #: Runs per arm (interleaved); the median run by TTFT p90 is reported.
    repeat: int = 1
    argv: list[str] = field(default_factory=list)
    #: EndpointPickerConfig text for the ``pdroute`` arm (None: the arm's default).
    epp_config: str | None = None


async def scrape(urls: Sequence[str]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    async with aiohttp.ClientSession() as http:
        for u in urls:
            try:
                async with http.get(u, timeout=aiohttp.ClientTimeout(total=5)) as r:
                    text = await r.text()
            except (aiohttp.ClientError, TimeoutError, OSError):
                continue
            out[u] = parse_prometheus_sums(text, COUNTERS)
    return out


#: EPP histograms summarised per run (name -> labels that tell the series apart).
EPP_HISTOGRAMS: dict[str, tuple[str, ...]] = {
    "llm_d_epp_prefix_indexer_hit_ratio": ("index",),
    "llm_d_epp_plugin_duration_seconds": ("extension_point", "plugin_type"),
}


async def epp_digest(info: ArmInfo, run_dir: Path) -> dict[str, Any]:
    """Save the EPP's /metrics text next to the run's logs and return the means and
    counts of :data:`EPP_HISTOGRAMS` (routing-side diagnosis: the index's hit ratio on
    the chosen endpoint, time spent per plugin). Empty when the arm has no EPP."""
    if not info.epp_metrics_url:
        return {}
    try:
        async with (
            aiohttp.ClientSession() as http,
            http.get(info.epp_metrics_url, timeout=aiohttp.ClientTimeout(total=5)) as r,
        ):
            text = await r.text()
    except (aiohttp.ClientError, TimeoutError, OSError):
        return {}
    await asyncio.to_thread(_write_text, run_dir / "epp-metrics.prom", text)
    return histogram_means(text, EPP_HISTOGRAMS)


def _write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def histogram_means(text: str, wanted: dict[str, tuple[str, ...]]) -> dict[str, Any]:
    """``{metric: {label values: {"count", "mean"}}}`` from Prometheus text (sums and
    counts of each histogram series, keyed by the values of the labels named in
    ``wanted``, joined with ``/``)."""
    acc: dict[str, dict[str, list[float]]] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, rest = line.partition("{")
        for metric, label_names in wanted.items():
            for suffix, slot in (("_sum", 0), ("_count", 1)):
                if name != metric + suffix:
                    continue
                labels, _, value = rest.rpartition("}")
                found: dict[str, str] = {}
                for part in labels.split(","):
                    k, _, v = part.partition("=")
                    found[k.strip()] = v.strip().strip('"')
                key = "/".join(found.get(n, "") for n in label_names)
                try:
                    num = float(value.strip().split()[0])
                except (ValueError, IndexError):
                    continue
                series = acc.setdefault(metric, {}).setdefault(key, [0.0, 0.0])
                series[slot] += num
    return {
        m: {k: {"count": c, "mean": (s / c if c else 0.0)} for k, (s, c) in by.items()}
        for m, by in acc.items()
    }


def _delta(
    after: dict[str, dict[str, float]], before: dict[str, dict[str, float]]
) -> dict[str, dict[str, float]]:
    return {
        u: {k: v - before.get(u, {}).get(k, 0.0) for k, v in vals.items()}
        for u, vals in after.items()
    }


def environment() -> dict[str, Any]:
    def git(*a: str) -> str:
        try:
            return subprocess.run(
                ["git", *a], check=False, capture_output=True, text=True, timeout=5
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "git_commit": git("rev-parse", "--short", "HEAD"),
        "load_average_at_start": os.getloadavg(),
    }


async def run_loadgen(
    info: ArmInfo, plan_file: Path, out_file: Path, cfg: RunConfig, label: str
) -> list[RequestRecord]:
    argv = [
        sys.executable,
        "-m",
        "pdroute.bench.loadgen",
        "--plan",
        str(plan_file),
        "--url",
        info.base_url,
        "--model",
        cfg.model,
        "--out",
        str(out_file),
        "--concurrency",
        str(cfg.concurrency),
        "--timeout",
        str(cfg.timeout_s),
        "--label",
        label,
    ]
    proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.DEVNULL)
    rc = await proc.wait()
    if rc != 0:
        raise ArmFailed(f"load generator exited with code {rc}")
    data = await asyncio.to_thread(out_file.read_bytes)
    return [RequestRecord.from_json(d) for d in orjson.loads(data)]


async def run_arm(
    spec: WorkloadSpec, arm: str, plan_file: Path, cfg: RunConfig, rep: int = 0
) -> dict[str, Any]:
    tag = arm if rep == 0 else f"{arm}-rep{rep}"
    run_dir = cfg.out / "runs" / spec.name / tag
    rec_file = cfg.out / "records" / spec.name / f"{tag}.json"
    rec_file.parent.mkdir(parents=True, exist_ok=True)
    t_start = time.monotonic()
    async with Arm(arm, spec.fleet, run_dir, cfg.model, epp_config=cfg.epp_config) as info:
        startup = time.monotonic() - t_start
        before = await scrape(info.metrics_urls)
        cpu0 = {k: cpu_seconds(p) for k, p in info.router_pids.items()}
        records = await run_loadgen(info, plan_file, rec_file, cfg, f"{spec.name}/{arm}")
        cpu1 = {k: cpu_seconds(p) for k, p in info.router_pids.items()}
        after = await scrape(info.metrics_urls)
        epp = await epp_digest(info, run_dir)
    delta = _delta(after, before)
    hits = sum(d["vllm:prefix_cache_hits_total"] for d in delta.values())
    queries = sum(d["vllm:prefix_cache_queries_total"] for d in delta.values())
    served = {
        u.removeprefix("http://").removesuffix("/metrics"): d["vllm:request_success_total"]
        for u, d in delta.items()
    }
    per_ep = {e: served.get(e, 0.0) for e in info.endpoints}
    summary = summarize(records, cfg.slo, info.endpoints)
    # The servers' own counts are authoritative for balance (peers may not pass
    # x-inference-served-by through); header counts stay in per_endpoint_header.
    summary["per_endpoint_header"] = summary.pop("per_endpoint")
    summary["per_endpoint"] = per_ep
    from pdroute.bench.stats import coefficient_of_variation

    summary["balance_cv"] = coefficient_of_variation(per_ep.values())
    cpu = {
        k: (cpu1[k] or 0.0) - (cpu0[k] or 0.0)
        for k in info.router_pids
        if cpu0.get(k) is not None and cpu1.get(k) is not None
    }
    result: dict[str, Any] = {
        "status": "ok",
        "startup_s": round(startup, 2),
        "summary": summary,
        "prefix_cache": {"hits": hits, "queries": queries, "hit_rate": hit_rate(hits, queries)},
        "router_cpu_s": {**cpu, "total": sum(cpu.values())},
        "server_counters": delta,
        **({"epp": epp} if epp else {}),
        "records_file": str(rec_file.relative_to(cfg.out)),
        "run_dir": str(run_dir.relative_to(cfg.out)),
    }
    if spec.name == "ramp":
        phases = []
        for i, rate in enumerate(spec.ramp_rates):
            recs = [r for r in records if r.phase == i]
            s = summarize(recs, cfg.slo)
            s.pop("per_endpoint", None)
            phases.append({"phase": i, "offered_rate": rate, **s})
        result["phases"] = phases
    return result


def arms_for(spec: WorkloadSpec, arms: Sequence[str]) -> list[str]:
    """P/D arms only run on workloads whose fleet has prefill servers."""
    return [a for a in arms if a not in PD_ARMS or spec.fleet.prefill > 0]


async def run_all(cfg: RunConfig) -> dict[str, Any]:
    cfg.out.mkdir(parents=True, exist_ok=True)
    (cfg.out / "plans").mkdir(exist_ok=True)
    results: dict[str, Any] = {
        "schema": 1,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "environment": environment(),
        "config": {
            "argv": cfg.argv,
            "arms": cfg.arms,
            "quick": cfg.quick,
            "repeat": cfg.repeat,
            "slo": {"ttft_s": cfg.slo.ttft_s, "itl_s": cfg.slo.itl_s},
            "concurrency": cfg.concurrency,
            "model": cfg.model,
        },
        "workloads": {},
    }
    for spec in cfg.workloads:
        plan = generate(spec)
        plan_file = cfg.out / "plans" / f"{spec.name}.json"
        plan_file.write_bytes(orjson.dumps([r.to_json() for r in plan]))
        wl: dict[str, Any] = {"spec": spec.to_json(), "shape": describe(spec, plan), "arms": {}}
        results["workloads"][spec.name] = wl
        runs: dict[str, list[dict[str, Any]]] = {a: [] for a in arms_for(spec, cfg.arms)}
        # Repeats interleave the arms (A B C A B C ...), so slow drift of the machine's
        # load spreads over all arms instead of landing on one.
        for rep in range(cfg.repeat):
            for arm, arm_runs in runs.items():
                print(
                    f"== {spec.name} / {arm}"
                    + (f" (repeat {rep + 1}/{cfg.repeat})" if cfg.repeat > 1 else "")
                    + f": {len(plan)} requests",
                    file=sys.stderr,
                    flush=True,
                )
                try:
                    arm_runs.append(await run_arm(spec, arm, plan_file, cfg, rep))
                except ArmFailed as e:
                    print(f"   {arm} FAILED: {e}", file=sys.stderr, flush=True)
                    arm_runs.append({"status": "failed", "reason": str(e)})
                wl["arms"][arm] = combine_repeats(arm_runs)
                write_results(cfg.out, results)  # partial results survive an interrupted run
    return results


def _ttft_p90(r: dict[str, Any]) -> float:
    v = r.get("summary", {}).get("ttft_s", {}).get("p90")
    return float("inf") if v is None else float(v)


def combine_repeats(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One arm's entry from its repeats: the run with the median TTFT p90 (all its
    metrics, so they stay consistent with each other), plus every run's key numbers
    under ``repeats``. Failed if every repeat failed; failures are counted."""
    ok = [r for r in runs if r.get("status") == "ok"]
    if not ok:
        return runs[-1]
    ranked = sorted(ok, key=_ttft_p90)
    chosen = dict(ranked[(len(ranked) - 1) // 2])
    if len(runs) > 1:
        chosen["repeats"] = [
            {
                "status": r.get("status"),
                "ttft_p90_s": r["summary"]["ttft_s"]["p90"] if r.get("status") == "ok" else None,
                "output_tokens_per_s": (
                    r["summary"]["output_tokens_per_s"] if r.get("status") == "ok" else None
                ),
                "hit_rate": r["prefix_cache"]["hit_rate"] if r.get("status") == "ok" else None,
                "reason": r.get("reason"),
            }
            for r in runs
        ]
    return chosen


def write_results(out: Path, results: dict[str, Any]) -> Path:
    path = out / "results.json"
    path.write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2))
    return path
