"""``pdroute bench``: compare pdroute with round robin and peer routers.

``pdroute bench run --workload shared-prefix --arms pdroute,round-robin,vllm-router,
sglang-router --quick --out DIR`` runs each workload against each arm (fresh
simulated fleet per arm, identical seeded plan) and writes ``DIR/results.json``,
``DIR/results.md`` and ``DIR/plots/*.png``; ``pdroute bench report --results DIR``
regenerates ``docs/benchmarks.md`` and ``docs/benchmarks/*.png`` from it.
See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson

from pdroute.bench.arms import ARMS
from pdroute.bench.report import render_markdown, render_plots, write_report
from pdroute.bench.runner import RunConfig, run_all, write_results
from pdroute.bench.stats import Slo
from pdroute.bench.workloads import WORKLOADS, WorkloadError, WorkloadSpec, default_spec

DEFAULT_ARMS = "pdroute,pdroute-pd,round-robin,vllm-router,vllm-router-rr,sglang-router"


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="bench_cmd", required=True)
    r = sub.add_parser("run", help="run workloads against arms, write a results directory")
    r.add_argument(
        "--workload",
        default="shared-prefix",
        help=f"comma list of {', '.join(WORKLOADS)}, or all (shared-prefix)",
    )
    r.add_argument("--arms", default=DEFAULT_ARMS, help=f"comma list of {', '.join(ARMS)}")
    r.add_argument("--profile", help="simulator latency profile (llama-3.1-8b-h100)")
    r.add_argument("--decode", type=int, help="model servers per arm (4)")
    r.add_argument("--prefill", type=int, help="of those, prefill servers for pdroute-pd")
    r.add_argument("--num-blocks", type=int, help="KV blocks per server (640)")
    r.add_argument("--max-num-seqs", type=int, help="running requests per server (64)")
    r.add_argument("--duration", type=float, help="seconds of arrivals per arm")
    r.add_argument("--rate", type=float, help="offered requests/s")
    r.add_argument("--groups", type=int, help="shared-prefix groups")
    r.add_argument("--group-skew", type=float, help="Zipf exponent of group popularity")
    r.add_argument("--system-tokens", type=int, help="shared prefix length (tokens)")
    r.add_argument("--output-tokens", type=int, help="output tokens per request")
    r.add_argument("--ramp-rates", help="comma list of req/s for the ramp")
    r.add_argument("--slo-ttft", type=float, default=1.0, help="goodput SLO: TTFT seconds (1.0)")
    r.add_argument("--slo-itl", type=float, default=0.05, help="goodput SLO: mean ITL s (0.05)")
    r.add_argument("--concurrency", type=int, default=512, help="client in-flight bound (512)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument(
        "--repeat", type=int, default=1, help="runs per arm, interleaved; median reported (1)"
    )
    r.add_argument(
        "--epp-config",
        type=Path,
        help="EndpointPickerConfig file for the pdroute arm (default: the arm's own)",
    )
    r.add_argument("--quick", action="store_true", help="short runs (a few minutes in all)")
    r.add_argument("--out", type=Path, default=Path("bench-results"), help="results directory")
    r.add_argument("--docs", type=Path, help="also regenerate this results page")
    rep = sub.add_parser("report", help="render the results page from a results directory")
    rep.add_argument(
        "--results",
        type=Path,
        action="append",
        required=True,
        help="directory with results.json; repeat to merge runs (a later run's workload "
        "replaces an earlier one's)",
    )
    rep.add_argument("--docs", type=Path, default=Path("docs/benchmarks.md"))


def specs_from_args(a: argparse.Namespace) -> list[WorkloadSpec]:
    names = list(WORKLOADS) if a.workload == "all" else [w for w in a.workload.split(",") if w]
    specs: list[WorkloadSpec] = []
    for n in names:
        s = default_spec(n, seed=a.seed, quick=a.quick)
        fleet = s.fleet
        for attr, key in (
            ("profile", "profile"),
            ("decode", "decode"),
            ("num_blocks", "num_blocks"),
            ("max_num_seqs", "max_num_seqs"),
        ):
            v = getattr(a, attr)
            if v is not None:
                fleet = replace(fleet, **{key: v})
        if a.prefill is not None and n == "pd":
            fleet = replace(fleet, prefill=a.prefill)
        s = replace(s, fleet=fleet)
        for attr, key in (
            ("duration", "duration_s"),
            ("rate", "rate"),
            ("groups", "groups"),
            ("group_skew", "group_skew"),
            ("system_tokens", "system_tokens"),
            ("output_tokens", "output_tokens"),
        ):
            v = getattr(a, attr)
            if v is not None:
                s = replace(s, **{key: v})
        if a.ramp_rates:
            s = replace(s, ramp_rates=tuple(float(x) for x in a.ramp_rates.split(",")))
        s.validate()
        specs.append(s)
    return specs


def _run(a: argparse.Namespace) -> int:
    arms = [x for x in a.arms.split(",") if x]
    bad = [x for x in arms if x not in ARMS]
    if bad:
        print(f"pdroute bench: --arms: unknown {bad}; known: {', '.join(ARMS)}", file=sys.stderr)
        return 2
    try:
        specs = specs_from_args(a)
    except WorkloadError as e:
        print(f"pdroute bench: {e}", file=sys.stderr)
        return 2
    epp_config = None
    if a.epp_config is not None:
        try:
            epp_config = a.epp_config.read_text()
        except OSError as e:
            print(f"pdroute bench: --epp-config {a.epp_config}: {e.strerror}", file=sys.stderr)
            return 2
    cfg = RunConfig(
        workloads=specs,
        arms=arms,
        out=a.out,
        slo=Slo(ttft_s=a.slo_ttft, itl_s=a.slo_itl),
        concurrency=a.concurrency,
        quick=a.quick,
        repeat=max(1, a.repeat),
        argv=["pdroute", "bench", *sys.argv[2:]] if len(sys.argv) > 2 else [],
        epp_config=epp_config,
    )
    results = asyncio.run(run_all(cfg))
    write_results(a.out, results)
    plots = render_plots(results, a.out / "plots")
    rel = {k: str(v.relative_to(a.out)) for k, v in plots.items()}
    md = render_markdown(results, rel)
    (a.out / "results.md").write_text(md)
    if a.docs:
        write_report(results, a.docs, a.docs.parent / a.docs.stem)
    print(md)
    print(f"results: {a.out / 'results.json'}", file=sys.stderr)
    return 0


def merge_results(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One results dict from several runs, in first-seen order. A later run of the
    same workload spec adds or replaces arms; with a different spec it replaces the
    workload. Every run's command is kept."""
    merged: dict[str, Any] = dict(parts[0])
    # The machine line describes the newest run; each run keeps its own commit and load.
    merged["environment"] = parts[-1].get("environment", merged.get("environment"))
    merged["workloads"] = {}
    runs: list[dict[str, Any]] = []
    for part in parts:
        env = part.get("environment") or {}
        this_run = {"created": part.get("created"), "argv": (part.get("config") or {}).get("argv")}
        for key in ("git_commit", "load_average_at_start"):
            if env.get(key):
                this_run[key] = env[key]
        for prior in part.get("runs") or [this_run]:
            if prior not in runs:
                runs.append(prior)
        for name, wl in (part.get("workloads") or {}).items():
            prior_wl = merged["workloads"].get(name)
            if prior_wl is not None and prior_wl.get("spec") == wl.get("spec"):
                # Same workload, same spec: arms merge (a rerun of one arm replaces it).
                arms = {**prior_wl.get("arms", {}), **wl.get("arms", {})}
                merged["workloads"][name] = {**wl, "arms": arms}
            else:
                merged["workloads"][name] = wl
    merged["runs"] = runs
    return merged


def _report(a: argparse.Namespace) -> int:
    dirs: list[Path] = a.results if isinstance(a.results, list) else [a.results]
    parts: list[dict[str, Any]] = []
    for d in dirs:
        path = d / "results.json"
        try:
            parts.append(orjson.loads(path.read_bytes()))
        except OSError as e:
            print(f"pdroute bench report: {path}: {e.strerror}", file=sys.stderr)
            return 2
        except orjson.JSONDecodeError as e:
            print(f"pdroute bench report: {path}: not JSON ({e})", file=sys.stderr)
            return 2
    results = merge_results(parts)
    png_dir = a.docs.parent / a.docs.stem
    md, plots = write_report(results, a.docs, png_dir)
    # The merged results next to the page: `--results <that dir>` regenerates it.
    png_dir.mkdir(parents=True, exist_ok=True)
    (png_dir / "results.json").write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2))
    print(f"wrote {md}" + "".join(f"\nwrote {p}" for p in plots.values()))
    return 0


def run(args: argparse.Namespace) -> int:
    if args.bench_cmd == "run":
        return _run(args)
    return _report(args)
