"""Results JSON -> markdown tables, PNG plots and the docs page.

:func:`render_markdown` is a pure function of the results dict (the unit tests
render a fixture). The page states comparisons as ratios against round robin and
against the peers, and lists every metric where pdroute is not the best arm, with
the mechanism behind it where the numbers show one, so a loss is never hidden.
Plots need matplotlib (the ``bench`` extra); without it the page says so and keeps
the tables.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

HEADLINE = "shared-prefix"
BASELINE = "round-robin"
OURS = ("pdroute", "pdroute-precise", "pdroute-pd")
CACHE_AWARE_PEERS = ("vllm-router", "sglang-router")

WORKLOAD_TITLES = {
    "shared-prefix": "Shared-prefix groups, skewed popularity, working set > one endpoint's KV",
    "shared-prefix-uniform": "Shared-prefix groups, uniform popularity, short outputs",
    "multi-turn": "Multi-turn chat sessions",
    "pd": "Long prompt, short output (P/D)",
    "short": "Short prompts and outputs",
    "ramp": "Load ramp to saturation",
}


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1000:.0f}"


def _s(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v * 100:.1f}%"


def _num(v: float | None, digits: int = 1) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _get(arm: Mapping[str, Any], *path: str) -> Any:
    cur: Any = arm
    for p in path:
        if not isinstance(cur, Mapping) or p not in cur:
            return None
        cur = cur[p]
    return cur


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def arm_table(arms: Mapping[str, Any]) -> list[str]:
    lines = [
        "| arm | TTFT p50 / p90 / p99 (ms) | ITL p50 / p90 (ms) | e2e p50 / p90 (s) "
        "| output tok/s | goodput req/s (% in SLO) | errors | prefix hit rate "
        "| balance CV | router CPU s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, arm in arms.items():
        if arm.get("status") != "ok":
            reason = str(arm.get("reason", "")).replace("|", "/").replace("\n", " ")[:160]
            lines.append(f"| {name} | **failed**: {reason} | | | | | | | | |")
            continue
        s = arm["summary"]
        errs = s.get("errors") or {}
        err_txt = (
            "0"
            if not errs
            else f"{_pct(s['error_rate'])} ("
            + ", ".join(f"{k}: {v}" for k, v in errs.items())
            + ")"
        )
        lines.append(
            f"| {name} "
            f"| {_ms(s['ttft_s']['p50'])} / {_ms(s['ttft_s']['p90'])} / {_ms(s['ttft_s']['p99'])} "
            f"| {_ms(s['itl_s']['p50'])} / {_ms(s['itl_s']['p90'])} "
            f"| {_s(s['e2e_s']['p50'])} / {_s(s['e2e_s']['p90'])} "
            f"| {_num(s['output_tokens_per_s'], 0)} "
            f"| {_num(s['goodput_rps'], 2)} ({_pct(s['goodput_fraction'])}) "
            f"| {err_txt} "
            f"| {_pct(_get(arm, 'prefix_cache', 'hit_rate'))} "
            f"| {_num(s.get('balance_cv'), 2)} "
            f"| {_num(_get(arm, 'router_cpu_s', 'total'), 1)} |"
        )
    return lines


def _ok(arms: Mapping[str, Any], name: str) -> Mapping[str, Any] | None:
    a = arms.get(name)
    return a if isinstance(a, Mapping) and a.get("status") == "ok" else None


def comparisons(arms: Mapping[str, Any]) -> list[str]:
    """Ratio lines: each pdroute arm against round robin and the cache-aware peers."""
    out: list[str] = []
    for ours in OURS:
        o = _ok(arms, ours)
        if o is None:
            continue
        for other in (BASELINE, *CACHE_AWARE_PEERS, "vllm-router-rr", "pdroute"):
            t = _ok(arms, other)
            if t is None or other == ours:
                continue
            ttft = _ratio(_get(t, "summary", "ttft_s", "p90"), _get(o, "summary", "ttft_s", "p90"))
            tps = _ratio(
                _get(o, "summary", "output_tokens_per_s"), _get(t, "summary", "output_tokens_per_s")
            )
            good = _ratio(_get(o, "summary", "goodput_rps"), _get(t, "summary", "goodput_rps"))
            out.append(
                f"- **{ours} vs {other}**: TTFT p90 {_num(ttft, 2)}x lower, "
                f"output tokens/s {_num(tps, 2)}x, goodput {_num(good, 2)}x"
            )
    return out


def _why(label: str, o: Mapping[str, Any], other: Mapping[str, Any], fixed: str) -> str:
    """The mechanism behind a loss, read off the numbers where they show one."""
    if fixed:
        return fixed
    ours_hr = _get(o, "prefix_cache", "hit_rate")
    their_hr = _get(other, "prefix_cache", "hit_rate")
    if ours_hr is not None and their_hr is not None and their_hr > ours_hr + 0.01:
        return (
            f"its prefix-cache hit rate is higher ({_pct(their_hr)} vs {_pct(ours_hr)}): "
            "it keeps each prefix on its endpoint more strictly, while pdroute's load "
            "scorers sometimes move a request to a less loaded endpoint that does not "
            "hold its prefix"
        )
    ours_max = _busiest(o)
    their_max = _busiest(other)
    if ours_max and their_max and their_max < ours_max * 0.95:
        return (
            f"its busiest endpoint served fewer requests ({their_max:.0f} vs "
            f"{ours_max:.0f}): with prefix affinity, where each prefix group first lands "
            "decides the load for the rest of the run, and an endpoint holding a popular "
            "group plus others runs short of KV and queues"
        )
    ours_cv = _get(o, "summary", "balance_cv")
    their_cv = _get(other, "summary", "balance_cv")
    if ours_cv is not None and their_cv is not None and their_cv < ours_cv - 0.05:
        return (
            f"it spreads requests more evenly (CV {their_cv:.2f} vs {ours_cv:.2f}) at a "
            "similar hit rate"
        )
    return (
        "no mechanism stands out in these numbers; on a shared 2-core machine a "
        "difference of this size can be noise"
    )


def _busiest(arm: Mapping[str, Any]) -> float:
    """Requests served by the arm's busiest endpoint (0 when unknown)."""
    per = _get(arm, "summary", "per_endpoint")
    if not isinstance(per, Mapping) or not per:
        return 0.0
    return float(max(per.values()))


def losses(arms: Mapping[str, Any]) -> list[str]:
    """Every metric where ``pdroute`` is not the best arm, with the likely cause."""
    o = _ok(arms, "pdroute")
    if o is None:
        return []
    others = {n: a for n, a in arms.items() if n not in OURS and _ok(arms, n) is not None}
    metrics: list[tuple[str, tuple[str, ...], bool, str]] = [
        ("TTFT p90", ("summary", "ttft_s", "p90"), False, "ms"),
        ("TTFT p50", ("summary", "ttft_s", "p50"), False, "ms"),
        ("ITL p90", ("summary", "itl_s", "p90"), False, "ms"),
        ("e2e p90", ("summary", "e2e_s", "p90"), False, "s"),
        ("output tokens/s", ("summary", "output_tokens_per_s"), True, ""),
        ("goodput", ("summary", "goodput_rps"), True, ""),
        ("prefix-cache hit rate", ("prefix_cache", "hit_rate"), True, ""),
        ("balance CV", ("summary", "balance_cv"), False, ""),
        ("router CPU seconds", ("router_cpu_s", "total"), False, ""),
        ("error rate", ("summary", "error_rate"), False, ""),
    ]
    why: dict[str, str] = {
        "router CPU seconds": "the EPP is a Python process doing an ext_proc round trip, "
        "prompt hashing and scoring per request, on top of Envoy; the Rust routers and "
        "plain Envoy do far less work per request",
        "balance CV": "affinity deliberately concentrates each prefix group on few "
        "endpoints; round robin spreads requests evenly by construction",
        "prefix-cache hit rate": "pdroute's load scorers trade some affinity for load "
        "balance (see the TTFT columns for which one paid off)",
        "ITL p90": "prefix affinity packs a group's requests onto one endpoint, so its "
        "decode batch is larger than under an even spread",
    }
    out: list[str] = []
    for label, path, higher_better, _unit in metrics:
        ours = _get(o, *path)
        if ours is None:
            continue
        better: list[tuple[str, float]] = []
        for n, a in others.items():
            v = _get(a, *path)
            if v is None:
                continue
            if "rate" in label:  # fractions: one percentage point is a difference
                wins = v > ours + 0.01 if higher_better else v < ours - 0.01
            else:
                wins = v > ours * 1.05 if higher_better else v < ours * 0.95 and ours - v > 1e-9
            if wins:
                better.append((n, v))
        if better:
            names = ", ".join(f"{n} ({_fmt(label, v)})" for n, v in better)
            best = min(better, key=lambda nv: -nv[1] if higher_better else nv[1])[0]
            reason = _why(label, o, others[best], why.get(label, ""))
            out.append(f"- {label}: pdroute {_fmt(label, ours)}; better: {names}. Why: {reason}.")
    return out


def _fmt(label: str, v: float) -> str:
    if label.startswith(("TTFT", "ITL")):
        return f"{v * 1000:.0f} ms"
    if label.startswith("e2e"):
        return f"{v:.2f} s"
    if "rate" in label:
        return f"{v * 100:.1f}%"
    if label == "router CPU seconds":
        return f"{v:.1f} s"
    return f"{v:.2f}"


def headline(results: Mapping[str, Any]) -> list[str]:
    """The headline comparison on the skewed shared-prefix workload, against the
    targets in benchmarks/README.md (met or not, stated either way)."""
    wl = (results.get("workloads") or {}).get(HEADLINE)
    if not wl:
        return []
    arms = wl.get("arms") or {}
    o = _ok(arms, "pdroute")
    if o is None:
        return ["- pdroute did not complete the headline workload (see below)."]
    ttft = _get(o, "summary", "ttft_s", "p90")
    out: list[str] = []
    rr = _ok(arms, BASELINE)
    if rr is not None:
        r = _ratio(_get(rr, "summary", "ttft_s", "p90"), ttft)
        t = _ratio(
            _get(o, "summary", "output_tokens_per_s"), _get(rr, "summary", "output_tokens_per_s")
        )
        out.append(
            f"- TTFT p90 vs round robin: {_ms(ttft)} ms vs "
            f"{_ms(_get(rr, 'summary', 'ttft_s', 'p90'))} ms = **{_num(r, 1)}x** better "
            f"(target >= 5x: {'met' if r is not None and r >= 5 else 'NOT met'})"
        )
        out.append(
            f"- output tokens/s vs round robin: **{_num(t, 2)}x** "
            f"(target >= 1.5x: {'met' if t is not None and t >= 1.5 else 'NOT met'})"
        )
    for peer in CACHE_AWARE_PEERS:
        p = _ok(arms, peer)
        if p is None:
            state = (arms.get(peer) or {}).get("reason", "not run")
            out.append(f"- vs {peer} (cache_aware): no result ({state})")
            continue
        theirs = _get(p, "summary", "ttft_s", "p90")
        r = _ratio(theirs, ttft)
        out.append(
            f"- TTFT p90 vs {peer} (cache_aware): {_ms(ttft)} ms vs {_ms(theirs)} ms = "
            f"**{_num(r, 2)}x** (target: better: {'met' if r is not None and r > 1 else 'NOT met'})"
        )
    rej = {
        n: _get(a, "summary", "error_rate")
        for n, a in arms.items()
        if isinstance(a, Mapping) and a.get("status") == "ok"
    }
    bad = {n: v for n, v in rej.items() if v}
    out.append(
        "- errors/rejections: "
        + (
            "none in any arm (no arm wins by rejecting)"
            if not bad
            else ", ".join(f"{n} {_pct(v)}" for n, v in bad.items())
        )
    )
    return out


def repeat_lines(arms: Mapping[str, Any]) -> list[str]:
    """Every repeat's TTFT p90 and tokens/s (the table shows the median run)."""
    out: list[str] = []
    for name, arm in arms.items():
        reps = arm.get("repeats") if isinstance(arm, Mapping) else None
        if not reps:
            continue
        vals = ", ".join(
            f"{_ms(r.get('ttft_p90_s'))} ms / {_num(r.get('output_tokens_per_s'), 0)} tok/s"
            if r.get("status") == "ok"
            else "failed"
            for r in reps
        )
        out.append(f"- {name}, every run (TTFT p90 / output tok/s): {vals}")
    if out:
        out.insert(0, "Repeats (the table shows each arm's median run by TTFT p90):\n")
    return out


def ramp_table(arms: Mapping[str, Any]) -> list[str]:
    lines = [
        "| arm | offered req/s | achieved req/s | TTFT p90 (ms) | ITL p90 (ms) | e2e p90 (s) "
        "| errors |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, arm in arms.items():
        for ph in arm.get("phases") or []:
            lines.append(
                f"| {name} | {ph['offered_rate']:g} | {_num(ph['requests_per_s'], 1)} "
                f"| {_ms(ph['ttft_s']['p90'])} | {_ms(ph['itl_s']['p90'])} "
                f"| {_s(ph['e2e_s']['p90'])} | {_pct(ph['error_rate'])} |"
            )
    return lines


def _run_context(run: Mapping[str, Any]) -> str:
    """``" (commit X, load average 1/5/15 min at start: a / b / c)"`` when known."""
    bits = []
    if run.get("git_commit"):
        bits.append(f"commit {run['git_commit']}")
    load = run.get("load_average_at_start")
    if isinstance(load, list | tuple) and len(load) == 3:
        bits.append("load average at start " + " / ".join(f"{float(x):.1f}" for x in load))
    return f" ({', '.join(bits)})" if bits else ""


def render_markdown(
    results: Mapping[str, Any], plots: Mapping[str, str] | None = None, notes: str = ""
) -> str:
    """The results page (``plots``: workload -> relative PNG path; ``notes``: a
    hand-written analysis placed after the headline)."""
    plots = plots or {}
    cfg = results.get("config", {})
    env = results.get("environment", {})
    slo = cfg.get("slo", {})
    lines = [
        "# pdroute benchmarks",
        "",
        "What does pdroute buy over round robin and over the routers you could use instead?",
        "Generated by `pdroute bench report` from a `pdroute bench run` results directory; "
        "do not edit by hand (see [benchmarks/README.md](../benchmarks/README.md)).",
        "",
        *[
            f"- run: {r.get('created', '?')}, command `{' '.join(r.get('argv') or [])}`"
            + _run_context(r)
            for r in (
                results.get("runs")
                or [{"created": results.get("created"), "argv": cfg.get("argv")}]
            )
        ],
        f"- machine: {env.get('cpus', '?')} CPUs, {env.get('platform', '?')}, "
        f"Python {env.get('python', '?')}, commit {env.get('git_commit', '?')}",
        f"- goodput SLO: TTFT <= {slo.get('ttft_s', '?')} s and mean ITL <= "
        f"{slo.get('itl_s', '?')} s per request",
        "- model servers: pdroute's vLLM simulator (same metrics, prefix cache with LRU "
        "eviction, continuous batching, latency from a GPU profile); every arm gets a fresh "
        "fleet (cold caches) and the identical, seeded request plan; open-loop Poisson "
        "arrivals; streaming completions.",
        "- balance CV: std-dev / mean of requests per decode endpoint (from the servers' "
        "own counters); router CPU: user+system seconds of the routing processes during "
        "the run (pdroute: Envoy + EPP [+ sidecars]; round robin: Envoy; peers: the router).",
        "",
    ]
    runs = results.get("runs") or []
    quick = ["--quick" in (r.get("argv") or []) for r in runs] or [bool(cfg.get("quick"))]
    quick_runs = any(quick)
    if all(quick):
        lines += [
            "> Quick mode: short runs on a 2-core machine shared with the simulators and the "
            "load generator. Treat differences under ~10% as noise.",
            "",
        ]
    elif quick_runs:
        lines += [
            "> Some tables come from quick runs (`--quick` in their command above: 30 s of "
            "arrivals, see each table's load line); treat differences under ~10% in "
            "those as noise.",
            "",
        ]
    head = headline(results)
    if head:
        lines += [f"## Headline: {WORKLOAD_TITLES[HEADLINE]}", "", *head, ""]
    if notes.strip():
        lines += [notes.strip(), ""]
    for name, wl in (results.get("workloads") or {}).items():
        arms = wl.get("arms") or {}
        spec = wl.get("spec") or {}
        fleet = spec.get("fleet") or {}
        shape = wl.get("shape") or {}
        lines += [f"## {WORKLOAD_TITLES.get(name, name)}", ""]
        fleet_txt = (
            f"{fleet.get('decode')} servers, profile `{fleet.get('profile')}`, "
            f"{fleet.get('num_blocks')} KV blocks x {fleet.get('block_size')} tokens each, "
            f"max {fleet.get('max_num_seqs')} running"
        )
        if fleet.get("prefill"):
            fleet_txt += (
                f" (P/D arm: {fleet.get('prefill')} of them prefill, "
                f"{int(fleet.get('decode', 0)) - int(fleet.get('prefill', 0))} decode)"
            )
        lines.append(f"- fleet: {fleet_txt}")
        if spec.get("group_skew"):
            lines.append(f"- group popularity: Zipf, exponent {spec['group_skew']}")
        lines.append(
            f"- load: {shape.get('requests')} requests over {spec.get('duration_s')} s, "
            f"offered {shape.get('offered_rate')} req/s, prompt ~{shape.get('prompt_tokens_p50')} "
            f"tokens (max {shape.get('prompt_tokens_max')}), {shape.get('output_tokens')} "
            "output tokens"
        )
        if shape.get("working_set_tokens"):
            lines.append(
                f"- working set: {spec.get('groups')} prefixes x {spec.get('system_tokens')} "
                f"tokens = {shape['working_set_tokens']} tokens = "
                f"{shape.get('working_set_over_endpoint_kv')}x one endpoint's KV "
                f"({shape.get('endpoint_kv_tokens')} tokens)"
            )
        lines += ["", *arm_table(arms), ""]
        reps = repeat_lines(arms)
        if reps:
            lines += [*reps, ""]
        comp = comparisons(arms)
        if comp:
            lines += [*comp, ""]
        if name == "ramp":
            lines += [*ramp_table(arms), ""]
        lost = losses(arms)
        if lost:
            lines += ["Where pdroute is not the best arm:", "", *lost, ""]
        if name in plots:
            lines += [f"![{name}]({plots[name]})", ""]
    failed = [
        f"- {w} / {a}: {arm.get('reason')}"
        for w, wl in (results.get("workloads") or {}).items()
        for a, arm in (wl.get("arms") or {}).items()
        if arm.get("status") != "ok"
    ]
    if failed:
        lines += ["## Arms that failed", "", *failed, ""]
    pending = results.get("pending") or []
    if pending:
        lines += ["## Not measured yet", "", *[f"- {p}" for p in pending], ""]
    if not plots:
        lines += ["_Plots: not rendered (install the `bench` extra: matplotlib)._", ""]
    return "\n".join(lines).rstrip() + "\n"


def render_plots(results: Mapping[str, Any], out_dir: Path, prefix: str = "") -> dict[str, Path]:
    """PNG per workload (TTFT p90 bars; latency vs offered load for the ramp).
    Returns workload -> file; empty when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return {}
    out_dir.mkdir(parents=True, exist_ok=True)
    made: dict[str, Path] = {}
    for name, wl in (results.get("workloads") or {}).items():
        arms = {n: a for n, a in (wl.get("arms") or {}).items() if a.get("status") == "ok"}
        if not arms:
            continue
        path = out_dir / f"{prefix}{name}.png"
        if name == "ramp" and any(a.get("phases") for a in arms.values()):
            fig, axes = plt.subplots(1, 2, figsize=(10, 4))
            for n, a in arms.items():
                ph = a.get("phases") or []
                x = [p["offered_rate"] for p in ph]
                for ax, key in zip(axes, ("ttft_s", "e2e_s"), strict=True):
                    y = [p[key]["p90"] for p in ph]
                    ax.plot(x, y, marker="o", label=n)
            axes[0].set_ylabel("TTFT p90 (s)")
            axes[1].set_ylabel("e2e latency p90 (s)")
            for ax in axes:
                ax.set_xlabel("offered load (req/s)")
                ax.set_yscale("log")
                ax.grid(True, alpha=0.3)
            axes[0].legend(fontsize=8)
            fig.suptitle("Load ramp: latency vs offered load")
        else:
            fig, ax = plt.subplots(figsize=(7, 3.8))
            names = list(arms)
            vals = [(arms[n]["summary"]["ttft_s"]["p90"] or 0.0) * 1000 for n in names]
            colors = ["#2a7" if n in OURS else "#889" for n in names]
            bars = ax.bar(names, vals, color=colors)
            ax.bar_label(bars, labels=[f"{v:.0f}" for v in vals], fontsize=8)
            ax.set_ylabel("TTFT p90 (ms)")
            ax.set_title(f"{name}: time to first token, p90 (lower is better)")
            ax.tick_params(axis="x", labelrotation=20, labelsize=8)
            ax.grid(True, axis="y", alpha=0.3)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        made[name] = path
    return made


def write_report(
    results: Mapping[str, Any], md_path: Path, png_dir: Path, png_prefix: str = ""
) -> tuple[Path, dict[str, Path]]:
    """Render plots into ``png_dir`` and the page into ``md_path`` (links relative);
    ``png_dir/notes.md``, when present, is the page's hand-written analysis."""
    plots = render_plots(results, png_dir, png_prefix)
    rel: dict[str, str] = {}
    for name, p in plots.items():
        try:
            rel[name] = str(p.resolve().relative_to(md_path.parent.resolve()))
        except ValueError:
            rel[name] = str(p.resolve())
    md_path.parent.mkdir(parents=True, exist_ok=True)
    notes_file = png_dir / "notes.md"
    notes = notes_file.read_text() if notes_file.is_file() else ""
    md_path.write_text(render_markdown(results, rel, notes))
    return md_path, plots
