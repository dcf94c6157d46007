"""Throughput of ``pdroute sim``: N simulated servers in one process under closed-loop load.

Starts ``pdroute sim --replicas N --port 0`` as a subprocess (so the load generator
does not share its event loop), then keeps ``--concurrency`` requests in flight,
round-robin over the replicas, for ``--duration`` seconds. Prints a readable table
and one JSON object (``--json`` writes it to a file too). Timings are never asserted.

    .venv/bin/python benchmarks/sim/throughput.py --replicas 16 --concurrency 64 --duration 10
    .venv/bin/python benchmarks/sim/throughput.py --targets 127.0.0.1:8080   # e.g. via Envoy
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import orjson


def percentile(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100.0 * len(xs)))]


def start_sim(args: argparse.Namespace) -> tuple[subprocess.Popen[bytes], list[str]]:
    cmd = [
        sys.executable,
        "-m",
        "pdroute.cli",
        "sim",
        "--replicas",
        str(args.replicas),
        "--port",
        "0",
        "--profile",
        args.profile,
        "--max-num-seqs",
        str(args.max_num_seqs),
        "--model",
        args.model,
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        proc.kill()
        raise SystemExit("pdroute sim exited before printing its ports")
    info = orjson.loads(line)
    return proc, list(info["addresses"])


async def load(args: argparse.Namespace, targets: list[str]) -> dict[str, Any]:
    body = {
        "model": args.model,
        "prompt": "benchmark prompt words " * max(1, args.prompt_words // 3),
        "max_tokens": args.max_tokens,
        "stream": args.stream,
    }
    payload = orjson.dumps(body)
    urls = [f"http://{t}/v1/completions" for t in targets]
    lat: list[float] = []
    errors: dict[str, int] = {}
    counter = 0
    loop = asyncio.get_running_loop()
    conn = aiohttp.TCPConnector(limit=0, limit_per_host=0)
    headers = {"Content-Type": "application/json"}
    async with aiohttp.ClientSession(connector=conn) as s:
        # warm-up: one request per target
        for u in urls:
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

        t0 = loop.time()
        await asyncio.gather(*(worker(i) for i in range(args.concurrency)))
        elapsed = loop.time() - t0
    return {
        "requests": counter,
        "elapsed_s": round(elapsed, 3),
        "req_per_s": round(counter / elapsed, 1),
        "latency_ms": {
            "p50": round(percentile(lat, 50) * 1000, 2),
            "p90": round(percentile(lat, 90) * 1000, 2),
            "p99": round(percentile(lat, 99) * 1000, 2),
        },
        "errors": errors,
    }


async def main_async(
    args: argparse.Namespace, proc: subprocess.Popen[bytes] | None, targets: list[str]
) -> dict[str, Any]:
    pid = proc.pid if proc else args.sim_pid
    cpu0 = _proc_cpu(pid) if pid else None
    try:
        res = await load(args, targets)
    finally:
        cpu1 = _proc_cpu(pid) if pid else None
        if proc is not None:
            proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
            if proc.poll() is None:
                proc.kill()
    if cpu0 is not None and cpu1 is not None:
        res["sim_cpu_cores"] = round((cpu1 - cpu0) / res["elapsed_s"], 2)
        if res["requests"]:
            res["sim_cpu_ms_per_request"] = round((cpu1 - cpu0) * 1000 / res["requests"], 3)
    res["config"] = {
        "replicas": args.replicas if proc else len(targets),
        "concurrency": args.concurrency,
        "duration_s": args.duration,
        "max_tokens": args.max_tokens,
        "prompt_words": args.prompt_words,
        "profile": args.profile,
        "stream": args.stream,
        "targets": "spawned" if proc else args.targets,
    }
    return res


def _proc_cpu(pid: int) -> float | None:
    """CPU seconds (user+sys) used by a process, from /proc (Linux only)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--replicas", type=int, default=16)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--max-tokens", type=int, default=4)
    ap.add_argument("--prompt-words", type=int, default=30)
    ap.add_argument("--profile", default="fast")
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--stream", action="store_true")
    ap.add_argument("--targets", default="", help="comma list host:port; skips spawning the sim")
    ap.add_argument("--model", default="bench", help="model name sent (and served when spawned)")
    ap.add_argument("--sim-pid", type=int, default=0, help="with --targets: sim process to meter")
    ap.add_argument("--json", default="", help="also write the JSON result to this file")
    args = ap.parse_args()
    proc: subprocess.Popen[bytes] | None = None
    targets = args.targets.split(",") if args.targets else []
    if not targets:
        proc, targets = start_sim(args)
    try:
        import uvloop

        res = uvloop.run(main_async(args, proc, targets))
    except ImportError:
        res = asyncio.run(main_async(args, proc, targets))
    out = orjson.dumps(res, option=orjson.OPT_INDENT_2).decode()
    rows = [
        ("replicas", res["config"]["replicas"]),
        ("concurrency", res["config"]["concurrency"]),
        ("max_tokens", res["config"]["max_tokens"]),
        ("requests", res["requests"]),
        ("req/s", res["req_per_s"]),
        ("p50 ms", res["latency_ms"]["p50"]),
        ("p99 ms", res["latency_ms"]["p99"]),
        ("sim CPU cores", res.get("sim_cpu_cores", "-")),
        ("sim CPU ms/req", res.get("sim_cpu_ms_per_request", "-")),
        ("errors", res["errors"] or "none"),
    ]
    print("\n".join(f"{k:>14}  {v}" for k, v in rows))
    print(out)
    if args.json:
        Path(args.json).write_text(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
