"""Sidecar overhead: straight to the model servers vs through ``pdroute sidecar``.

Setup (127.0.0.1, free ports): one fake model-server process (``--fake-backend``
mode of this script: aiohttp, fixed answers, a prefill answer carrying NIXL-style
``kv_transfer_params`` and a 4-event SSE stream) serving both the "prefill" and
the "decode" port, and a real ``pdroute sidecar`` process (uvloop) in front of
the decode port. Requests are sequential (concurrency 1) so the latency is the
sidecar's own cost, not queueing.

Cases (each ``--requests`` times, after a warm-up):

* ``direct``        client -> decode                           (baseline)
* ``sidecar-local`` client -> sidecar -> decode                 (no prefiller header)
* ``direct-pd``     client -> prefill, then client -> decode    (P/D done by the client)
* ``sidecar-pd``    client -> sidecar -> prefill + decode       (the sidecar's P/D)
* ``*-stream``      the same with ``stream: true`` (SSE, cached_tokens rewritten)

Reported: p50/p90/p99 ms per case, the sidecar process's CPU time per request
(utime+stime from /proc: the load-independent cost), and the added p50 of each sidecar case over
its baseline. Prints a table and JSON (``--json FILE`` also writes it). The
numbers depend on the machine and its load: compare cases of one run.

    .venv/bin/python benchmarks/sidecar/overhead.py [--requests 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

REPO = Path(__file__).resolve().parents[2]

PARAMS = {
    "do_remote_prefill": True,
    "do_remote_decode": False,
    "remote_block_ids": [[1, 2, 3]],
    "remote_engine_id": "e",
    "remote_request_id": "cmpl-1",
    "remote_host": "127.0.0.1",
    "remote_port": 1,
    "tp_size": 1,
}
USAGE = {
    "prompt_tokens": 300,
    "completion_tokens": 16,
    "prompt_tokens_details": {"cached_tokens": 0},
}
PROMPT = "Summarize the following text in one sentence: " + "lorem ipsum " * 64


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- the fake backend ----------------------------------------------------------
def serve_fake(ports: list[int]) -> None:
    from aiohttp import web

    prefill_answer = orjson.dumps(
        {"choices": [{"text": "x"}], "usage": USAGE, "kv_transfer_params": PARAMS}
    )
    decode_answer = orjson.dumps({"choices": [{"text": "y" * 64}], "usage": USAGE})
    sse = [
        b'data: {"choices":[{"text":"a"}],"usage":null}\n\n',
        b'data: {"choices":[{"text":"b"}],"usage":null}\n\n',
        b'data: {"choices":[],"usage":' + orjson.dumps(USAGE) + b"}\n\n",
        b"data: [DONE]\n\n",
    ]

    async def completions(request: web.Request) -> web.StreamResponse:
        body = orjson.loads(await request.read())
        kvp = body.get("kv_transfer_params") or {}
        if kvp.get("do_remote_decode"):
            return web.Response(body=prefill_answer, content_type="application/json")
        if body.get("stream"):
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            for ev in sse:
                await resp.write(ev)
            await resp.write_eof()
            return resp
        return web.Response(body=decode_answer, content_type="application/json")

    async def main() -> None:
        app = web.Application()
        app.router.add_post("/v1/completions", completions)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        for p in ports:
            await web.TCPSite(runner, "127.0.0.1", p).start()
        await asyncio.Event().wait()

    try:
        import uvloop

        uvloop.run(main())
    except ImportError:
        asyncio.run(main())


# -- the measurement -----------------------------------------------------------
def _wait_port(port: int, proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on {port}")


async def _measure(
    n: int, warmup: int, calls: list[tuple[str, bytes, dict[str, str]]]
) -> list[float]:
    import aiohttp

    lat: list[float] = []
    async with aiohttp.ClientSession() as s:
        for i in range(n + warmup):
            t0 = time.perf_counter()
            for url, body, headers in calls:
                async with s.post(url, data=body, headers=headers) as r:
                    await r.read()
                    if r.status != 200:
                        raise RuntimeError(f"{url} -> {r.status}")
            if i >= warmup:
                lat.append((time.perf_counter() - t0) * 1000)
    return lat


def _cpu_s(pid: int) -> float:
    """utime + stime of a process, in seconds (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def run(requests: int, warmup: int) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="pdroute-sidecar-bench-"))
    prefill_port, decode_port, sc_port, sc_metrics = (free_port() for _ in range(4))
    eps = work / "endpoints.yaml"
    eps.write_text(f"endpoints: [{{address: 127.0.0.1, port: {prefill_port}}}]\n")
    procs: list[subprocess.Popen[bytes]] = []
    env = dict(os.environ, PYTHONPATH=str(REPO))
    try:
        fake = subprocess.Popen(
            [sys.executable, __file__, "--fake-backend", str(prefill_port), str(decode_port)],
            env=env,
            start_new_session=True,
        )
        procs.append(fake)
        sidecar = subprocess.Popen(
            [
                sys.executable, "-m", "pdroute.cli", "sidecar",
                "--host", "127.0.0.1", "--port", str(sc_port),
                "--metrics-port", str(sc_metrics),
                "--model-server-port", str(decode_port),
                "--endpoints-file", str(eps),
                "--log-level", "WARNING",
            ],
            env=env,
            cwd=str(REPO),
            start_new_session=True,
        )  # fmt: skip
        procs.append(sidecar)
        _wait_port(prefill_port, fake, "fake backend")
        _wait_port(decode_port, fake, "fake backend")
        _wait_port(sc_port, sidecar, "sidecar")

        def body(stream: bool) -> bytes:
            return orjson.dumps(
                {"model": "m", "prompt": PROMPT, "max_tokens": 16, "stream": stream}
            )

        def prefill_body() -> bytes:
            return orjson.dumps(
                {
                    "model": "m",
                    "prompt": PROMPT,
                    "max_tokens": 1,
                    "stream": False,
                    "kv_transfer_params": {"do_remote_decode": True},
                }
            )

        d_url = f"http://127.0.0.1:{decode_port}/v1/completions"
        p_url = f"http://127.0.0.1:{prefill_port}/v1/completions"
        s_url = f"http://127.0.0.1:{sc_port}/v1/completions"
        hdr = {"Content-Type": "application/json"}
        pd_hdr = {**hdr, "x-prefiller-host-port": f"127.0.0.1:{prefill_port}"}
        cases: dict[str, list[tuple[str, bytes, dict[str, str]]]] = {}
        for stream in (False, True):
            sfx = "-stream" if stream else ""
            cases["direct" + sfx] = [(d_url, body(stream), hdr)]
            cases["sidecar-local" + sfx] = [(s_url, body(stream), hdr)]
            cases["direct-pd" + sfx] = [(p_url, prefill_body(), hdr), (d_url, body(stream), hdr)]
            cases["sidecar-pd" + sfx] = [(s_url, body(stream), pd_hdr)]
        results: dict[str, dict[str, float]] = {}
        for name, calls in cases.items():
            cpu0 = _cpu_s(sidecar.pid)
            lat = asyncio.run(_measure(requests, warmup, calls))
            cpu = _cpu_s(sidecar.pid) - cpu0
            results[name] = {
                "p50_ms": round(statistics.median(lat), 3),
                "p90_ms": round(_pct(lat, 0.9), 3),
                "p99_ms": round(_pct(lat, 0.99), 3),
                "mean_ms": round(statistics.fmean(lat), 3),
                # CPU the sidecar process burnt per request: load-independent cost.
                "sidecar_cpu_ms_per_req": round(cpu * 1000 / (requests + warmup), 3),
            }
        added: dict[str, float] = {}
        for kind in ("", "-stream"):
            for label, measured, base in (
                ("local", "sidecar-local", "direct"),
                ("pd", "sidecar-pd", "direct-pd"),
            ):
                added[label + kind] = round(
                    results[measured + kind]["p50_ms"] - results[base + kind]["p50_ms"], 3
                )
        return {
            "benchmark": "sidecar_overhead",
            "requests_per_case": requests,
            "concurrency": 1,
            "cases": results,
            "added_p50_ms": added,
            "cpu_count": os.cpu_count(),
            "loadavg_1m": os.getloadavg()[0],
        }
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait()


def table(doc: dict[str, Any]) -> str:
    rows = [f"{'case':<22}{'p50 ms':>10}{'p90 ms':>10}{'p99 ms':>10}{'sidecar CPU ms/req':>20}"]
    for name, r in doc["cases"].items():
        rows.append(
            f"{name:<22}{r['p50_ms']:>10.3f}{r['p90_ms']:>10.3f}{r['p99_ms']:>10.3f}"
            f"{r['sidecar_cpu_ms_per_req']:>20.3f}"
        )
    rows.append("")
    for name, v in doc["added_p50_ms"].items():
        rows.append(f"added p50 by the sidecar ({name}): {v:.3f} ms")
    return "\n".join(rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--json", type=Path, help="also write the JSON document here")
    ap.add_argument("--fake-backend", nargs=2, type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.fake_backend:
        serve_fake(list(args.fake_backend))
        return 0
    doc = run(args.requests, args.warmup)
    print(table(doc))
    out = orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode()
    print(out)
    if args.json:
        args.json.write_text(out + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
