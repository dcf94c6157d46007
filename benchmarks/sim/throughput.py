"""Throughput and CPU per request of ``pdroute sim``: N simulated servers in one process.

Starts ``pdroute sim --replicas N --port 0`` as a subprocess (so the load generator
does not share its event loop or its CPU accounting), keeps ``--concurrency`` short
``/v1/completions`` requests in flight for ``--duration`` seconds, spread over the
replicas, and reports req/s, latency and the simulator's CPU (``/proc/<pid>/stat``
before/after: CPU cores used and CPU milliseconds per request, the number that decides
how many requests the simulator costs a 2-core machine).

Load generators: ``--loadgen wrk`` (default when ``wrk`` is on PATH: one wrk thread per
replica via a generated Lua script, cheapest, so the simulator gets a core of its own)
or ``--loadgen aiohttp`` (uvloop + aiohttp, round robin over the replicas).
``--stream`` sends ``"stream": true`` (SSE; every token is a chunk).
``--modes nonstream,stream`` runs both, one fresh simulator each.

``--profile`` runs the simulator under cProfile *in its own process* (the profiler is
enabled around ``pdroute.sim.cmd.run``) and prints the top 30 functions by tottime
(CPU numbers of a profiled run are inflated by the profiler; use them for the ranking).

Prints a readable table, then one JSON object (``--json FILE`` writes it too). Timings
are never asserted anywhere.

    .venv/bin/python benchmarks/sim/throughput.py                       # 16 replicas, c64, both modes
    .venv/bin/python benchmarks/sim/throughput.py --modes nonstream --profile
    .venv/bin/python benchmarks/sim/throughput.py --loadgen aiohttp --duration 5
    .venv/bin/python benchmarks/sim/throughput.py --targets 127.0.0.1:8080 --sim-pid 1234  # e.g. via Envoy
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import pstats
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parents[2]


def percentile(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100.0 * len(xs)))]


def proc_cpu(pid: int) -> float | None:
    """CPU seconds (user+sys) used by a process, from /proc (Linux only)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# ---- the simulator process ------------------------------------------------------------
def sim_argv(args: argparse.Namespace) -> list[str]:
    return [
        "--replicas", str(args.replicas), "--port", "0", "--profile", args.latency_profile,
        "--max-num-seqs", str(args.max_num_seqs), "--model", args.model,
    ]  # fmt: skip


def start_sim(
    args: argparse.Namespace, prof_out: str | None
) -> tuple[subprocess.Popen[bytes], list[str]]:
    if prof_out:
        cmd = [sys.executable, __file__, "--serve-profiled", prof_out, "--", *sim_argv(args)]
    else:
        cmd = [sys.executable, "-m", "pdroute.cli", "sim", *sim_argv(args)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, cwd=ROOT)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        proc.kill()
        raise SystemExit("pdroute sim exited before printing its ports")
    return proc, list(orjson.loads(line)["addresses"])


def stop_sim(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(30)
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def serve_profiled(out: str, argv: list[str]) -> int:
    """Child mode: ``pdroute sim`` under cProfile; stats written to ``out`` on SIGTERM."""
    import cProfile

    from pdroute.sim import cmd

    parser = argparse.ArgumentParser()
    cmd.add_arguments(parser)
    args = parser.parse_args(argv)
    prof = cProfile.Profile()
    prof.enable()
    try:
        rc = cmd.run(args)
    finally:
        prof.disable()
        prof.dump_stats(out)
    return rc


# ---- load generators ------------------------------------------------------------------
def body_bytes(args: argparse.Namespace, stream: bool) -> bytes:
    body: dict[str, Any] = {
        "model": args.model,
        "prompt": "benchmark prompt words " * max(1, args.prompt_words // 3),
        "max_tokens": args.max_tokens,
    }
    if stream:
        body["stream"] = True
    return orjson.dumps(body)


_LUA = r"""
local targets = {%(targets)s}
local n = 0
function setup(thread)
  n = n + 1
  local t = targets[(n - 1) %% #targets + 1]
  thread.addr = wrk.lookup(t[1], t[2])[1]
end
wrk.method = "POST"
wrk.path = "/v1/completions"
wrk.headers["Content-Type"] = "application/json"
wrk.body = %(body)s
function done(summary, latency, requests)
  local non2xx = summary.errors.status or 0
  io.write(string.format(
    "WRKJSON {\"requests\": %%d, \"duration_us\": %%d, \"non2xx\": %%d, \"connect\": %%d, " ..
    "\"read\": %%d, \"write\": %%d, \"timeout\": %%d, \"p50_us\": %%d, \"p90_us\": %%d, \"p99_us\": %%d}\n",
    summary.requests, summary.duration, non2xx, summary.errors.connect, summary.errors.read,
    summary.errors.write, summary.errors.timeout, latency:percentile(50),
    latency:percentile(90), latency:percentile(99)))
end
"""


def _lua_str(b: bytes) -> str:
    return '"' + b.decode().replace("\\", "\\\\").replace('"', '\\"') + '"'


def run_wrk(args: argparse.Namespace, targets: list[str], payload: bytes) -> dict[str, Any]:
    wrk = shutil.which("wrk")
    if wrk is None:
        raise SystemExit("--loadgen wrk: wrk is not on PATH (apt-get install wrk)")
    pairs = ", ".join('{{"{}", "{}"}}'.format(*t.rsplit(":", 1)) for t in targets)
    threads = min(len(targets), args.concurrency)
    with tempfile.TemporaryDirectory(prefix="simbench-") as d:
        script = Path(d) / "post.lua"
        script.write_text(_LUA % {"targets": pairs, "body": _lua_str(payload)})
        # warm-up: a second of load (imports, caches, connection setup)
        subprocess.run(
            [wrk, f"-t{threads}", f"-c{args.concurrency}", "-d1s", "-s", str(script),
             f"http://{targets[0]}/v1/completions"],
            capture_output=True, check=False,
        )  # fmt: skip
        cmd = [wrk, f"-t{threads}", f"-c{args.concurrency}", f"-d{args.duration:g}s",
               "--timeout", "10s", "-s", str(script), f"http://{targets[0]}/v1/completions"]  # fmt: skip
        t0 = time.monotonic()
        cpu_before = _sim_cpu(args)
        _children_cpu()  # reset: the warm-up run is not counted
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        out_b, _ = proc.communicate()
        cpu_after = _sim_cpu(args)
        lg_cpu = _children_cpu()
        elapsed = time.monotonic() - t0
    out = out_b.decode()
    m = re.search(r"^WRKJSON (.*)$", out, re.M)
    if m is None:
        raise SystemExit(f"wrk failed:\n{out}")
    w = orjson.loads(m.group(1))
    ok = w["requests"] - w["non2xx"]
    dur = w["duration_us"] / 1e6
    errors = {k: w[k] for k in ("non2xx", "connect", "read", "write", "timeout") if w[k]}
    return {
        "requests": ok,
        "elapsed_s": round(dur, 3),
        "req_per_s": round(ok / dur, 1),
        "latency_ms": {q: round(w[f"{q}_us"] / 1000, 2) for q in ("p50", "p90", "p99")},
        "errors": errors,
        "_cpu": (cpu_before, cpu_after, elapsed),
        "loadgen_cpu_s": lg_cpu,
    }


_CHILD_CPU = [0.0]


def _children_cpu() -> float:
    """CPU seconds of reaped children (wrk) since the last call."""
    t = os.times()
    total = t.children_user + t.children_system
    delta, _CHILD_CPU[0] = total - _CHILD_CPU[0], total
    return round(delta, 3)


_SIM_PID = [0]


def _sim_cpu(args: argparse.Namespace) -> float | None:
    return proc_cpu(_SIM_PID[0]) if _SIM_PID[0] else None


async def _aiohttp_load(
    args: argparse.Namespace, targets: list[str], payload: bytes
) -> dict[str, Any]:
    import aiohttp

    urls = [f"http://{t}/v1/completions" for t in targets]
    lat: list[float] = []
    errors: dict[str, int] = {}
    counter = 0
    loop = asyncio.get_running_loop()
    conn = aiohttp.TCPConnector(limit=0, limit_per_host=0)
    headers = {"Content-Type": "application/json"}
    async with aiohttp.ClientSession(connector=conn) as s:
        for u in urls:  # warm-up: one request per target
            async with s.post(u, data=payload, headers=headers) as r:
                await r.read()
        t_end = loop.time() + args.duration

        async def worker(i: int) -> None:
            nonlocal counter
            k = i
            while loop.time() < t_end:
                u = urls[k % len(urls)]
                k += args.concurrency
                t0 = loop.time()
                try:
                    async with s.post(u, data=payload, headers=headers) as r:
                        await r.read()
                        if r.status != 200:
                            errors[str(r.status)] = errors.get(str(r.status), 0) + 1
                            continue
                except aiohttp.ClientError as e:
                    errors[type(e).__name__] = errors.get(type(e).__name__, 0) + 1
                    continue
                lat.append(loop.time() - t0)
                counter += 1

        cpu_before = _sim_cpu(args)
        lg0 = time.process_time()
        t0 = loop.time()
        await asyncio.gather(*(worker(i) for i in range(args.concurrency)))
        elapsed = loop.time() - t0
        cpu_after = _sim_cpu(args)
        lg_cpu = round(time.process_time() - lg0, 3)
    return {
        "requests": counter,
        "elapsed_s": round(elapsed, 3),
        "req_per_s": round(counter / elapsed, 1),
        "latency_ms": {
            q: round(percentile(lat, p) * 1000, 2)
            for q, p in (("p50", 50), ("p90", 90), ("p99", 99))
        },
        "errors": errors,
        "_cpu": (cpu_before, cpu_after, elapsed),
        "loadgen_cpu_s": lg_cpu,
    }


def run_aiohttp(args: argparse.Namespace, targets: list[str], payload: bytes) -> dict[str, Any]:
    try:
        import uvloop

        return uvloop.run(_aiohttp_load(args, targets, payload))
    except ImportError:
        return asyncio.run(_aiohttp_load(args, targets, payload))


# ---- one measured run -----------------------------------------------------------------
def run_mode(args: argparse.Namespace, stream: bool) -> dict[str, Any]:
    proc: subprocess.Popen[bytes] | None = None
    targets = args.targets.split(",") if args.targets else []
    prof_out = None
    tmp = tempfile.mkdtemp(prefix="simprof-") if args.profile else None
    if tmp:
        prof_out = str(Path(tmp) / "sim.prof")
    if not targets:
        proc, targets = start_sim(args, prof_out)
        _SIM_PID[0] = proc.pid
    else:
        _SIM_PID[0] = args.sim_pid
    payload = body_bytes(args, stream)
    try:
        if args.loadgen == "wrk":
            res = run_wrk(args, targets, payload)
        else:
            res = run_aiohttp(args, targets, payload)
    finally:
        if proc is not None:
            stop_sim(proc)
    cpu0, cpu1, wall = res.pop("_cpu")
    if cpu0 is not None and cpu1 is not None:
        res["sim_cpu_cores"] = round((cpu1 - cpu0) / wall, 3)
        if res["requests"]:
            res["sim_cpu_ms_per_request"] = round((cpu1 - cpu0) * 1000 / res["requests"], 4)
    res["mode"] = "stream" if stream else "nonstream"
    if prof_out and Path(prof_out).exists():
        res["profile_top30"] = profile_top(prof_out, 30)
    return res


def profile_top(path: str, n: int) -> list[dict[str, Any]]:
    st = pstats.Stats(path)
    rows = []
    for (file, line, fn), (_cc, nc, tt, ct, _callers) in st.stats.items():  # type: ignore[attr-defined]
        rows.append((tt, ct, nc, f"{_short(file)}:{line}({fn})"))
    rows.sort(reverse=True)
    return [
        {"tottime_s": round(tt, 4), "cumtime_s": round(ct, 4), "calls": nc, "function": name}
        for tt, ct, nc, name in rows[:n]
    ]


def _short(file: str) -> str:
    for marker in ("/site-packages/", "/lib/python3"):
        if marker in file:
            return file.split(marker, 1)[1]
    with contextlib.suppress(ValueError):
        return str(Path(file).relative_to(ROOT))
    return file


def table(results: list[dict[str, Any]]) -> str:
    cols = [
        ("mode", lambda r: r["mode"]),
        ("req/s", lambda r: r["req_per_s"]),
        ("p50 ms", lambda r: r["latency_ms"]["p50"]),
        ("p99 ms", lambda r: r["latency_ms"]["p99"]),
        ("sim cores", lambda r: r.get("sim_cpu_cores", "-")),
        ("sim CPU ms/req", lambda r: r.get("sim_cpu_ms_per_request", "-")),
        ("loadgen CPU s", lambda r: r.get("loadgen_cpu_s", "-")),
        ("errors", lambda r: r["errors"] or "none"),
    ]
    rows = [[str(f(r)) for _, f in cols] for r in results]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, (h, _) in enumerate(cols)]
    lines = ["  ".join(h.rjust(w) for (h, _), w in zip(cols, widths, strict=True))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    for r in results:
        if "profile_top30" in r:
            lines.append(f"\ncProfile of the simulator ({r['mode']}), top 30 by tottime:")
            lines.append(f"{'tottime':>9} {'cumtime':>9} {'calls':>9}  function")
            for p in r["profile_top30"]:
                lines.append(
                    f"{p['tottime_s']:9.3f} {p['cumtime_s']:9.3f} {p['calls']:9d}  {p['function']}"
                )
    return "\n".join(lines)


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--serve-profiled":
        rest = sys.argv[3:]
        return serve_profiled(sys.argv[2], rest[1:] if rest[:1] == ["--"] else rest)
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--replicas", type=int, default=16)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--max-tokens", type=int, default=4)
    ap.add_argument("--prompt-words", type=int, default=30)
    ap.add_argument("--latency-profile", default="fast", help="pdroute sim --profile")
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--modes", default="nonstream,stream", help="comma list: nonstream, stream")
    ap.add_argument("--stream", action="store_true", help="same as --modes stream")
    ap.add_argument(
        "--loadgen", choices=["wrk", "aiohttp"], default="wrk" if shutil.which("wrk") else "aiohttp"
    )
    ap.add_argument("--profile", action="store_true", help="cProfile the simulator, print top 30")
    ap.add_argument("--targets", default="", help="comma list host:port; skips spawning the sim")
    ap.add_argument("--model", default="bench", help="model name sent (and served when spawned)")
    ap.add_argument("--sim-pid", type=int, default=0, help="with --targets: sim process to meter")
    ap.add_argument("--json", default="", help="also write the JSON result to this file")
    args = ap.parse_args()
    modes = ["stream"] if args.stream else [m for m in args.modes.split(",") if m]
    for m in modes:
        if m not in ("nonstream", "stream"):
            ap.error(f"--modes: unknown mode {m!r}")
    results = [run_mode(args, m == "stream") for m in modes]
    out = {
        "config": {
            "replicas": args.replicas if not args.targets else len(args.targets.split(",")),
            "concurrency": args.concurrency,
            "duration_s": args.duration,
            "max_tokens": args.max_tokens,
            "prompt_words": args.prompt_words,
            "latency_profile": args.latency_profile,
            "loadgen": args.loadgen,
            "profiled": args.profile,
            "targets": args.targets or "spawned",
            "cpus": os.cpu_count(),
            "loadavg_1m": os.getloadavg()[0],
        },
        "results": results,
    }
    print(table(results))
    text = orjson.dumps(out, option=orjson.OPT_INDENT_2).decode()
    print(text)
    if args.json:
        Path(args.json).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
