"""Issue #3's end-to-end target: 16 simulated servers behind Envoy + EPP, short requests.

Starts ``pdroute up --decode 16 --prefill 0 --sim-processes shared --no-epp-tls`` on
free ports (its own process group), waits for its ready file, warms up, then runs
``wrk -t1 -c64 -d10s`` with a Lua script POSTing a short ``/v1/completions`` JSON to the
gateway, and reads every component's CPU from ``/proc/<pid>/stat`` before and after
(cores used, CPU ms per request, share of the machine's CPU): the simulator's share is
what this directory is about; the EPP is usually the bottleneck. Prints a table, then
one JSON object (``--json FILE`` writes it too). Timings are never asserted.

    .venv/bin/python benchmarks/sim/gateway.py
    .venv/bin/python benchmarks/sim/gateway.py --connections 64 --duration 10 --max-tokens 4
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson
from throughput import proc_cpu  # type: ignore[import-not-found]  # this script's folder

ROOT = Path(__file__).resolve().parents[2]

_LUA = r"""
wrk.method = "POST"
wrk.path = "/v1/completions"
wrk.headers["Content-Type"] = "application/json"
wrk.body = %(body)s
function done(summary, latency, requests)
  io.write(string.format(
    "WRKJSON {\"requests\": %%d, \"duration_us\": %%d, \"non2xx\": %%d, \"connect\": %%d, " ..
    "\"read\": %%d, \"write\": %%d, \"timeout\": %%d, \"p50_us\": %%d, \"p90_us\": %%d, \"p99_us\": %%d}\n",
    summary.requests, summary.duration, summary.errors.status or 0, summary.errors.connect,
    summary.errors.read, summary.errors.write, summary.errors.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99)))
end
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_range(n: int) -> int:
    """A base port with ``n`` consecutive free ports (checked by binding each)."""
    for _ in range(200):
        base = random.randrange(20000, 60000 - n)
        socks = []
        try:
            for p in range(base, base + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise SystemExit("no free port range found")


def run_wrk(wrk: str, script: Path, url: str, conns: int, duration: float) -> dict[str, Any]:
    cmd = [wrk, "-t1", f"-c{conns}", f"-d{duration:g}s", "--timeout", "10s", "-s", str(script), url]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False).stdout
    m = re.search(r"^WRKJSON (.*)$", out, re.M)
    if m is None:
        raise SystemExit(f"wrk failed:\n{out}")
    return dict(orjson.loads(m.group(1)))


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--decode", type=int, default=16)
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--warmup", type=float, default=3.0)
    ap.add_argument("--max-tokens", type=int, default=4)
    ap.add_argument("--prompt-words", type=int, default=30)
    ap.add_argument("--profile", default="fast", help="simulator latency profile")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    wrk = shutil.which("wrk")
    if wrk is None:
        raise SystemExit("wrk is not on PATH (apt-get install wrk)")
    port = free_port()
    base = free_range(args.decode + 32)
    run_dir = Path(tempfile.mkdtemp(prefix="pdroute-gw-bench-"))
    ready = run_dir / "ready.json"
    # `python -m` from this checkout (PYTHONPATH too, for the children): a worktree of
    # another commit measures that commit's code.
    cmd = [
        sys.executable, "-m", "pdroute.cli", "up", "--decode", str(args.decode),
        "--prefill", "0", "--sim-processes", "shared", "--no-epp-tls", "--port", str(port),
        "--base-port", str(base), "--run-dir", str(run_dir / "run"), "--ready-file", str(ready),
        "--profile", args.profile, "--model", "bench",
    ]  # fmt: skip
    log = (run_dir / "up.log").open("wb")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    up = subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT, env=env
    )
    try:
        t0 = time.monotonic()
        while not ready.exists():
            if up.poll() is not None or time.monotonic() - t0 > 180:
                raise SystemExit(f"pdroute up did not get ready; log: {run_dir / 'up.log'}")
            time.sleep(0.2)
        time.sleep(0.2)
        info = orjson.loads(ready.read_bytes())
        comps = [(str(c["what"]), int(c["pid"])) for c in info["components"]]
        body = orjson.dumps(
            {
                "model": "bench",
                "prompt": "benchmark prompt words " * max(1, args.prompt_words // 3),
                "max_tokens": args.max_tokens,
            }
        )
        script = run_dir / "post.lua"
        body_lua = '"' + body.decode().replace("\\", "\\\\").replace('"', '\\"') + '"'
        script.write_text(_LUA % {"body": body_lua})
        url = f"http://127.0.0.1:{port}/v1/completions"
        run_wrk(wrk, script, url, args.connections, args.warmup)
        before = {pid: proc_cpu(pid) for _, pid in comps}
        t_start = time.monotonic()
        w = run_wrk(wrk, script, url, args.connections, args.duration)
        wall = time.monotonic() - t_start
        after = {pid: proc_cpu(pid) for _, pid in comps}
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(up.pid, signal.SIGINT)
        try:
            up.wait(30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(up.pid, signal.SIGKILL)
            up.wait()
        log.close()
    ok = w["requests"] - w["non2xx"]
    dur = w["duration_us"] / 1e6
    rows = []
    seen: set[int] = set()
    for what, pid in comps:
        if pid in seen:  # shared simulator process: listed once per server
            continue
        seen.add(pid)
        b, a = before.get(pid), after.get(pid)
        if a is None or b is None:
            continue
        cpu = a - b
        rows.append(
            {
                "component": what,
                "pid": pid,
                "cpu_s": round(cpu, 3),
                "cores": round(cpu / wall, 3),
                "cpu_ms_per_request": round(cpu * 1000 / ok, 4) if ok else None,
                "share_of_machine": round(cpu / wall / (os.cpu_count() or 1), 3),
            }
        )
    res = {
        "config": {
            "decode": args.decode,
            "sim_processes": "shared",
            "epp_tls": False,
            "connections": args.connections,
            "duration_s": args.duration,
            "max_tokens": args.max_tokens,
            "prompt_words": args.prompt_words,
            "profile": args.profile,
            "cpus": os.cpu_count(),
            "loadavg_1m": os.getloadavg()[0],
        },
        "requests": ok,
        "req_per_s": round(ok / dur, 1),
        "latency_ms": {q: round(w[f"{q}_us"] / 1000, 2) for q in ("p50", "p90", "p99")},
        "errors": {k: w[k] for k in ("non2xx", "connect", "read", "write", "timeout") if w[k]},
        "components": rows,
    }
    print(f"req/s {res['req_per_s']}  p50 {res['latency_ms']['p50']} ms  "
          f"p99 {res['latency_ms']['p99']} ms  errors {res['errors'] or 'none'}")  # fmt: skip
    print(f"{'component':>24} {'pid':>8} {'cores':>7} {'CPU ms/req':>11} {'machine %':>10}")
    for r in rows:
        print(
            f"{r['component'][:24]:>24} {r['pid']:>8} {r['cores']:>7} "
            f"{r['cpu_ms_per_request']!s:>11} {r['share_of_machine'] * 100:>9.1f}%"
        )
    text = orjson.dumps(res, option=orjson.OPT_INDENT_2).decode()
    print(text)
    if args.json:
        Path(args.json).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
