"""Envoy's own floor for ext_proc routing, and which bootstrap knobs move it.

Issue #2 wants Envoy + EPP at >= 2,500 req/s and <= 1 ms added p50 at concurrency
1 on a 2-core machine. This script measures what Envoy itself costs when the
ext_proc server costs next to nothing: ``go_stub/`` (a Go grpc-go ext_proc server
speaking exactly the EPP's protocol, round robin, no parsing) stands in for the
EPP. Whatever Envoy + the Go stub reach here is the ceiling for any EPP on this
machine. Results and their reading: ``go_stub/README.md``.

Setup (127.0.0.1, free ports, private temp dir), shared with
``envoy_overhead.py`` by import: 16 model-server stand-ins in one process
(``fast_backend.py``), wrk -t1 POSTing the same small completions request, Envoy
``--concurrency 1`` with the bootstrap ``pdroute.stack.envoy.render_bootstrap``
renders. Each *variant* (``--list``) post-processes that bootstrap (the dict,
written to the variant's own file; ``pdroute/stack/envoy.py`` is not touched) or
changes Envoy's command line or the stub's environment. ``alone`` is Envoy
without ext_proc (the baseline for added latency), ``default`` the production
bootstrap + the Go stub. (``request_trailer_mode: SKIP`` is not a variant: Envoy
refuses it with ``FULL_DUPLEX_STREAMED``.)

Timing mode, per variant and concurrency (1 and ``--concurrency``): req/s,
p50/p99, non-2xx, CPU ms per request of Envoy (user/sys), the stub, the backends
and wrk (``/proc/<pid>/stat`` and the waited-for child's rusage), Envoy's
syscalls and context switches per request (``perf stat`` tracepoints, when perf
is installed), Envoy's per-thread CPU (``/proc/<pid>/task``: is its worker
saturated?) and the req/s its busiest worker could serve at 100%, and the whole
machine's busy cores from ``/proc/stat`` (others' load shows up as ``other``: the
machine is shared). Variants run interleaved for ``--repeats`` rounds; the table
shows medians, the JSON has every round and each variant's quietest round.

``--instructions N`` instead counts Envoy's user-space instructions per request
under callgrind (N requests at c=1 and at ``--ir-concurrency``, net of the idle
rate): reproducible to ~0.3% and blind to the machine's load, so it ranks knobs
where timing on a shared machine cannot. Needs valgrind; Envoy runs under its own
``--vgdb-prefix`` and is controlled by pid only.

    .venv/bin/python benchmarks/epp/envoy_knobs.py [--duration 5] [--repeats 3]
        [--variants resp-skip,buffered,...] [--list] [--instructions 400] [--json out.json]

The Go stub is built on first use with ``go build`` into
``$PDROUTE_CACHE/go_stub/<source hash>/`` (``--stub-binary`` overrides).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # the repository root: tests.netutil
sys.path.insert(0, str(HERE))  # envoy_overhead, next to this file

import envoy_overhead as eo  # noqa: E402

from pdroute.stack.envoy import (  # noqa: E402
    EnvoyOptions,
    EnvoyProcess,
    find_envoy,
    render_bootstrap,
)
from tests.netutil import free_port  # noqa: E402

STUB_DIR = Path(__file__).resolve().with_name("go_stub")
CLK_TCK = os.sysconf("SC_CLK_TCK")

Bootstrap = dict[str, Any]


# -- bootstrap surgery -------------------------------------------------------------


def _hcm(bs: Bootstrap) -> dict[str, Any]:
    listener = bs["static_resources"]["listeners"][0]
    hcm: dict[str, Any] = listener["filter_chains"][0]["filters"][0]["typed_config"]
    return hcm


def _ext_proc(bs: Bootstrap) -> dict[str, Any]:
    for f in _hcm(bs)["http_filters"]:
        if f["name"] == "envoy.filters.http.ext_proc":
            cfg: dict[str, Any] = f["typed_config"]
            return cfg
    raise KeyError("no ext_proc filter in the bootstrap")


def _route(bs: Bootstrap) -> dict[str, Any]:
    route: dict[str, Any] = _hcm(bs)["route_config"]["virtual_hosts"][0]["routes"][0]
    return route


def _cluster(bs: Bootstrap, name: str) -> dict[str, Any]:
    for c in bs["static_resources"]["clusters"]:
        if c["name"] == name:
            cluster: dict[str, Any] = c
            return cluster
    raise KeyError(f"no cluster {name!r} in the bootstrap")


def _runtime(bs: Bootstrap, key: str, value: Any) -> None:
    layers = bs.setdefault("layered_runtime", {"layers": []})["layers"]
    if not layers:
        layers.append({"name": "static", "static_layer": {}})
    layers[0]["static_layer"][key] = value


def no_retry(bs: Bootstrap, _port: int) -> None:
    route = _route(bs)
    route["route"].pop("retry_policy", None)
    route.pop("request_body_buffer_limit", None)


def buffered(bs: Bootstrap, _port: int) -> None:
    _ext_proc(bs)["processing_mode"]["request_body_mode"] = "BUFFERED"


def headers_only(bs: Bootstrap, _port: int) -> None:
    # Not a usable config (the EPP needs the body to schedule): the fixed cost of one
    # ext_proc stream with one message each way, for the decomposition.
    _ext_proc(bs)["processing_mode"]["request_body_mode"] = "NONE"


def no_response_attributes(bs: Bootstrap, _port: int) -> None:
    _ext_proc(bs).pop("response_attributes", None)


def retain_route(bs: Bootstrap, _port: int) -> None:
    # Routing is keyed on envoy.lb metadata (override_host), not on the route: the
    # EPP's clear_route_cache can be ignored.
    _ext_proc(bs)["route_cache_action"] = "RETAIN"


def no_request_id(bs: Bootstrap, _port: int) -> None:
    _hcm(bs)["generate_request_id"] = False


def no_stats(bs: Bootstrap, _port: int) -> None:
    bs["stats_config"] = {"use_all_default_tags": False, "stats_matcher": {"reject_all": True}}


def stats_inclusion(bs: Bootstrap, _port: int) -> None:
    # Keep what an operator watches (the EPP cluster's health and the ext_proc
    # filter's errors and timeouts); per-request counters of everything else go.
    prefixes = ("cluster.epp.", "http.inference.ext_proc.", "server.")
    bs["stats_config"] = {
        "use_all_default_tags": False,
        "stats_matcher": {"inclusion_list": {"patterns": [{"prefix": p} for p in prefixes]}},
    }


def no_health_check(bs: Bootstrap, _port: int) -> None:
    epp = _cluster(bs, "epp")
    for key in ("health_checks", "outlier_detection", "common_lb_config"):
        epp.pop(key, None)


def small_h2_windows(bs: Bootstrap, _port: int) -> None:
    opts = _cluster(bs, "epp")["typed_extension_protocol_options"]
    h2 = next(iter(opts.values()))["explicit_http_config"]["http2_protocol_options"]
    h2["initial_stream_window_size"] = 65536
    h2["initial_connection_window_size"] = 1048576


def oghttp2(bs: Bootstrap, _port: int) -> None:
    _runtime(bs, "envoy.reloadable_features.http2_use_oghttp2", True)


def nghttp2(bs: Bootstrap, _port: int) -> None:
    _runtime(bs, "envoy.reloadable_features.http2_use_oghttp2", False)


def google_grpc(bs: Bootstrap, port: int) -> None:
    svc = _ext_proc(bs)["grpc_service"]
    svc.pop("envoy_grpc")
    svc["google_grpc"] = {"target_uri": f"127.0.0.1:{port}", "stat_prefix": "epp"}


def lean(bs: Bootstrap, port: int) -> None:
    """Every knob that keeps the EPP's information and the routing semantics."""
    retain_route(bs, port)
    no_stats(bs, port)


@dataclass(frozen=True)
class Variant:
    name: str
    doc: str
    mutate: tuple[Callable[[Bootstrap, int], None], ...] = ()
    epp: bool = True
    envoy_concurrency: int = 1
    response_headers: bool = True
    #: Extra EnvoyOptions fields.
    options: dict[str, Any] = field(default_factory=dict)
    #: Extra environment of the Go stub (a stub per distinct value).
    stub_env: tuple[tuple[str, str], ...] = ()


VARIANTS: tuple[Variant, ...] = (
    Variant("alone", "Envoy without ext_proc (baseline)", epp=False),
    Variant("default", "production bootstrap + Go stub"),
    Variant("no-retry", "no retry_policy, no request_body_buffer_limit", (no_retry,)),
    Variant("resp-skip", "response_header_mode SKIP (one round trip)", response_headers=False),
    Variant("buffered", "request_body_mode BUFFERED (routing in the body answer)", (buffered,)),
    Variant("no-resp-attrs", "no response_attributes [upstream.address]", (no_response_attributes,)),
    Variant("retain-route", "route_cache_action RETAIN (ignore clear_route_cache)", (retain_route,)),
    Variant("no-request-id", "HCM generate_request_id false", (no_request_id,)),
    Variant("no-stats", "stats_matcher reject_all, no default tags", (no_stats,)),
    Variant(
        "stats-incl",
        "stats only for cluster.epp., http.inference.ext_proc., server.",
        (stats_inclusion,),
    ),
    Variant("no-hc", "no health check / outlier detection on the epp cluster", (no_health_check,)),
    Variant("h2-small-win", "epp cluster h2 windows 64 KiB stream / 1 MiB connection", (small_h2_windows,)),
    Variant("oghttp2", "runtime http2_use_oghttp2 true", (oghttp2,)),
    Variant("nghttp2", "runtime http2_use_oghttp2 false", (nghttp2,)),
    Variant("google-grpc", "ext_proc over google_grpc instead of envoy_grpc", (google_grpc,)),
    Variant("concurrency-2", "Envoy --concurrency 2", envoy_concurrency=2),
    Variant(
        "headers-only",
        "reference only: request_body_mode NONE + resp-skip (one message each way)",
        (headers_only,),
        response_headers=False,
    ),
    Variant("stub-1p", "the Go stub with GOMAXPROCS=1", stub_env=(("GOMAXPROCS", "1"),)),
    Variant("lean", "retain-route + no-stats", (lean,)),
    Variant(
        "lean+skip+buffered",
        "lean + resp-skip + buffered + no-retry (everything that helps, semantics change)",
        (lean, buffered, no_retry),
        response_headers=False,
    ),
)  # fmt: skip


class VariantEnvoy(EnvoyProcess):
    """:class:`EnvoyProcess` started from a given bootstrap dict instead of the one
    its options render (everything else, readiness and health helpers, is reused)."""

    def __init__(
        self,
        options: EnvoyOptions,
        bootstrap: Bootstrap,
        *,
        wrapper: list[str] | None = None,
        **kw: Any,
    ) -> None:
        super().__init__(options, wrapper=wrapper, **kw)
        self.bootstrap = bootstrap

    def render(self) -> str:
        return yaml.safe_dump(self.bootstrap, sort_keys=False)


# -- the Go stub ---------------------------------------------------------------------


def build_stub() -> Path:
    """``go build`` the stub into the cache, keyed by a hash of its sources."""
    digest = hashlib.sha256()
    for name in ("go.mod", "go.sum", "main.go"):
        digest.update(name.encode() + b"\0" + (STUB_DIR / name).read_bytes())
    cache = Path(os.environ.get("PDROUTE_CACHE", str(Path.home() / ".cache" / "pdroute")))
    out = cache / "go_stub" / digest.hexdigest()[:16] / "go_stub"
    if out.exists():
        return out
    go = shutil.which("go") or (
        "/usr/local/go/bin/go" if Path("/usr/local/go/bin/go").exists() else ""
    )
    if not go:
        raise FileNotFoundError(
            "Go is not installed (https://go.dev/doc/install), or pass --stub-binary"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"go_stub.{os.getpid()}.tmp")
    print(f"building the Go stub into {out} (first run: a minute or two)", file=sys.stderr)
    subprocess.run([go, "build", "-o", str(tmp), "."], cwd=STUB_DIR, check=True)
    tmp.rename(out)
    return out


def start_stub(
    binary: Path, pool: list[str], env: tuple[tuple[str, str], ...] = ()
) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen(
        [str(binary), "-addr", "127.0.0.1:0", "-pool", ",".join(pool)],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env={**os.environ, **dict(env)},
    )
    assert proc.stdout is not None
    first = proc.stdout.readline().split()
    if len(first) != 2 or first[0] != "listening":
        eo.stop(proc)
        raise RuntimeError(f"go_stub did not start: {first!r}")
    eo.wait_line(proc, "ready", 10)
    return proc, int(first[1].rpartition(":")[2])


# -- CPU accounting ------------------------------------------------------------------


def thread_cpu(pid: int) -> dict[int, tuple[str, float]]:
    """tid -> (thread name, utime + stime seconds) for every thread of ``pid``."""
    out: dict[int, tuple[str, float]] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except OSError:
            continue  # the thread ended
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        out[int(task.name)] = (name, (int(fields[11]) + int(fields[12])) / CLK_TCK)
    return out


def machine_busy_s() -> float:
    """CPU seconds all cores spent not idle since boot (``/proc/stat``)."""
    with open("/proc/stat") as f:
        parts = f.readline().split()[1:]
    vals = [int(v) for v in parts]
    idle = vals[3] + vals[4]  # idle + iowait
    return (sum(vals[:8]) - idle) / CLK_TCK


def user_sys(pid: int) -> tuple[float, float]:
    """(utime, stime) of a process in seconds."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


PERF_EVENTS = ("raw_syscalls:sys_enter", "context-switches")


def start_perf(pid: int, seconds: float) -> subprocess.Popen[str] | None:
    """Count ``pid``'s syscalls and context switches for ``seconds`` (``perf stat``;
    tracepoints need no hardware counters). None without perf."""
    perf = shutil.which("perf")
    if not perf:
        return None
    return subprocess.Popen(
        [perf, "stat", "-x,", "-e", ",".join(PERF_EVENTS), "-p", str(pid), "--", "sleep",
         f"{seconds:g}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip


def perf_counts(proc: subprocess.Popen[str] | None) -> dict[str, int]:
    if proc is None:
        return {}
    _, err = proc.communicate(timeout=60)
    out: dict[str, int] = {}
    for line in err.splitlines():
        parts = line.split(",")
        if len(parts) > 2 and parts[2] in PERF_EVENTS and parts[0].isdigit():
            out[parts[2]] = int(parts[0])
    return out


@dataclass
class Snapshot:
    t: float
    envoy_threads: dict[int, tuple[str, float]]
    envoy_user_sys: tuple[float, float]
    stub: float
    backends: float
    children: float
    machine: float

    @classmethod
    def take(cls, envoy_pid: int, stub_pid: int | None, backend_pid: int) -> Snapshot:
        ru = resource.getrusage(resource.RUSAGE_CHILDREN)
        return cls(
            t=time.monotonic(),
            envoy_threads=thread_cpu(envoy_pid),
            envoy_user_sys=user_sys(envoy_pid),
            stub=eo.cpu_seconds(stub_pid) if stub_pid else 0.0,
            backends=eo.cpu_seconds(backend_pid),
            children=ru.ru_utime + ru.ru_stime,
            machine=machine_busy_s(),
        )


def thread_groups(a: Snapshot, b: Snapshot, wall: float) -> dict[str, float]:
    """Envoy's CPU by thread name (threads of one name summed), in cores."""
    out: dict[str, float] = {}
    for tid, (name, after) in b.envoy_threads.items():
        before = a.envoy_threads.get(tid, (name, 0.0))[1]
        out[name] = out.get(name, 0.0) + (after - before) / wall
    return {k: round(v, 3) for k, v in sorted(out.items(), key=lambda kv: -kv[1]) if v > 0.0005}


def busiest_worker(a: Snapshot, b: Snapshot, wall: float) -> float:
    """The busiest Envoy worker thread's utilization (cores, 1.0 = saturated)."""
    best = 0.0
    for tid, (name, after) in b.envoy_threads.items():
        if name.startswith("wrk:worker"):
            best = max(best, (after - a.envoy_threads.get(tid, (name, 0.0))[1]) / wall)
    return round(best, 3)


# -- one variant ---------------------------------------------------------------------


@dataclass
class Ctx:
    envoy_bin: str
    pool: list[str]
    #: Running stubs by their extra environment: (pid, port).
    stubs: dict[tuple[tuple[str, str], ...], tuple[int, int]]
    backend_pid: int
    wrk: str
    script: Path
    tmp: Path
    duration: float
    warmup: float
    concurrency: int


def variant_bootstrap(v: Variant, ctx: Ctx, stub_port: int) -> tuple[EnvoyOptions, Bootstrap]:
    """``v``'s options and its bootstrap: the production one, then ``v``'s edits."""
    opts = EnvoyOptions(
        listen_port=free_port(),
        admin_port=free_port(),
        epp_port=stub_port if v.epp else 1,
        pool=ctx.pool,
        epp_enabled=v.epp,
        response_headers=v.response_headers,
        **v.options,
    )
    bs = copy.deepcopy(render_bootstrap(opts))
    for fn in v.mutate:
        fn(bs, stub_port)
    return opts, bs


def run_variant(v: Variant, ctx: Ctx, rnd: int) -> dict[str, Any]:
    stub_pid, stub_port = ctx.stubs[v.stub_env]
    opts, bs = variant_bootstrap(v, ctx, stub_port)
    envoy = VariantEnvoy(
        opts,
        bs,
        binary=ctx.envoy_bin,
        concurrency=v.envoy_concurrency,
        workdir=ctx.tmp / f"{v.name}-{rnd}",
    )
    envoy.start()
    out: dict[str, Any] = {}
    try:
        assert envoy.proc is not None
        pid = envoy.proc.pid
        if v.epp:
            envoy.wait_epp_health(True, 15)
        url = envoy.url + "/v1/completions"
        eo.run_wrk(ctx.wrk, url, ctx.script, ctx.concurrency, ctx.warmup)
        measured_stub = stub_pid if v.epp else None
        for conc in (1, ctx.concurrency):
            a = Snapshot.take(pid, measured_stub, ctx.backend_pid)
            # perf counts a window inside the wrk run; normalized by wrk's rate.
            window = max(ctx.duration - 0.5, 0.5)
            perf = start_perf(pid, window)
            res, _ = eo.run_wrk(ctx.wrk, url, ctx.script, conc, ctx.duration)
            b = Snapshot.take(pid, measured_stub, ctx.backend_pid)
            counts = perf_counts(perf)
            per_s = max(res["rps"], 1e-9) * window
            if counts:
                res["envoy_syscalls_per_req"] = round(
                    counts.get("raw_syscalls:sys_enter", 0) / per_s, 2
                )
                res["envoy_ctx_switches_per_req"] = round(
                    counts.get("context-switches", 0) / per_s, 2
                )
            wall = b.t - a.t
            reqs = max(res["requests"], 1)
            envoy_s = sum(t for _, t in b.envoy_threads.values()) - sum(
                t for _, t in a.envoy_threads.values()
            )
            ours = (
                envoy_s + (b.stub - a.stub) + (b.backends - a.backends) + (b.children - a.children)
            )
            busy = (b.machine - a.machine) / wall
            res.update(
                {
                    "envoy_cpu_ms_per_req": round(envoy_s / reqs * 1000, 4),
                    "envoy_user_ms_per_req": round(
                        (b.envoy_user_sys[0] - a.envoy_user_sys[0]) / reqs * 1000, 4
                    ),
                    "envoy_sys_ms_per_req": round(
                        (b.envoy_user_sys[1] - a.envoy_user_sys[1]) / reqs * 1000, 4
                    ),
                    "stub_cpu_ms_per_req": round((b.stub - a.stub) / reqs * 1000, 4),
                    "backends_cpu_ms_per_req": round((b.backends - a.backends) / reqs * 1000, 4),
                    "wrk_cpu_ms_per_req": round((b.children - a.children) / reqs * 1000, 4),
                    "envoy_cores": round(envoy_s / wall, 3),
                    "envoy_worker_busiest_cores": busiest_worker(a, b, wall),
                    # What Envoy's busiest worker could serve at 100% of a core, at this
                    # run's cost per request: Envoy's own ceiling whatever the EPP costs.
                    "envoy_worker_ceiling_rps": round(
                        res["rps"] / max(busiest_worker(a, b, wall), 0.05)
                    ),
                    "envoy_threads_cores": thread_groups(a, b, wall),
                    "stub_cores": round((b.stub - a.stub) / wall, 3),
                    "machine_busy_cores": round(busy, 3),
                    "other_cores": round(max(busy - ours / wall, 0.0), 3),
                }
            )
            out[f"c{conc}"] = res
            print(
                f"  [{rnd}] {v.name} c={conc}: {res['rps']:.0f} req/s p50 {res.get('p50_ms')} ms, "
                f"Envoy {res['envoy_cpu_ms_per_req']} ms/req, worker {res['envoy_worker_busiest_cores']}, "
                f"machine {res['machine_busy_cores']} (other {res['other_cores']})",
                file=sys.stderr,
            )
    finally:
        envoy.stop()
    return out


# -- instruction counts (callgrind): numbers that a shared machine does not move -----


class Callgrind:
    """Envoy under ``valgrind --tool=callgrind --instr-atstart=no``, controlled through
    its own ``--vgdb-prefix`` and explicit pid (never another user's valgrind)."""

    def __init__(self, workdir: Path) -> None:
        self.dir = workdir
        self.prefix = str(workdir / "vgdb")
        self.out = workdir / "callgrind.out"
        self.pid = 0

    def wrapper(self) -> list[str]:
        valgrind = shutil.which("valgrind")
        if not valgrind:
            raise FileNotFoundError("valgrind is not installed: run `apt-get install -y valgrind`")
        return [
            valgrind,
            "--tool=callgrind",
            "--instr-atstart=no",
            f"--vgdb-prefix={self.prefix}",
            f"--callgrind-out-file={self.out}",
        ]

    def command(self, *cmd: str) -> None:
        if self.pid <= 0:
            raise RuntimeError("callgrind: no pid of our own to control")
        subprocess.run(
            ["callgrind_control", f"--vgdb-prefix={self.prefix}", *cmd, str(self.pid)],
            check=True,
            capture_output=True,
            timeout=120,
        )

    def zero(self) -> None:
        self.command("-z")

    def dump(self) -> int:
        """Dump and return the instructions counted since the last zero."""
        before = set(self.dir.glob("callgrind.out*"))
        self.command("-d")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            new = sorted(set(self.dir.glob("callgrind.out*")) - before)
            for path in new:
                for line in path.read_text(errors="replace").splitlines():
                    if line.startswith(("totals:", "summary:")):
                        return int(line.split()[1])
            time.sleep(0.2)
        raise TimeoutError("callgrind dump did not appear")


def post_n(url: str, n: int, concurrency: int) -> tuple[int, float]:
    """POST the benchmark body ``n`` times over ``concurrency`` keep-alive connections;
    returns (non-2xx count, wall seconds)."""
    import http.client
    import threading
    from urllib.parse import urlsplit

    u = urlsplit(url)
    bad = [0]
    lock = threading.Lock()

    def worker(count: int) -> None:
        conn = http.client.HTTPConnection(u.hostname or "127.0.0.1", u.port or 80, timeout=120)
        for _ in range(count):
            conn.request("POST", u.path, eo.BODY, {"Content-Type": "application/json"})
            r = conn.getresponse()
            r.read()
            if not 200 <= r.status < 300:
                with lock:
                    bad[0] += 1
        conn.close()

    per = [n // concurrency + (1 if i < n % concurrency else 0) for i in range(concurrency)]
    threads = [threading.Thread(target=worker, args=(k,)) for k in per if k]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return bad[0], time.monotonic() - t0


def count_variant(v: Variant, ctx: Ctx, requests: int, conc: int) -> dict[str, Any]:
    """Envoy's instructions per request for ``v`` at concurrency 1 and ``conc``, net of
    what an idle Envoy executes in the same wall time (health checks, timers)."""
    _stub_pid, stub_port = ctx.stubs[v.stub_env]
    opts, bs = variant_bootstrap(v, ctx, stub_port)
    workdir = ctx.tmp / f"ir-{v.name}"
    workdir.mkdir(parents=True, exist_ok=True)
    cg = Callgrind(workdir)
    envoy = VariantEnvoy(
        opts,
        bs,
        wrapper=cg.wrapper(),
        binary=ctx.envoy_bin,
        concurrency=v.envoy_concurrency,
        workdir=workdir,
    )
    envoy.start(timeout_s=600)
    out: dict[str, Any] = {}
    try:
        assert envoy.proc is not None
        cg.pid = envoy.proc.pid
        if v.epp:
            envoy.wait_epp_health(True, 120)
        url = envoy.url + "/v1/completions"
        cg.command("-i", "on")
        post_n(url, 20, 1)  # warm caches, connections, lazily built state
        cg.zero()
        idle_s = 5.0
        time.sleep(idle_s)
        idle_rate = cg.dump() / idle_s
        out["idle_instructions_per_s"] = round(idle_rate)
        for c in (1, conc):
            cg.zero()
            bad, wall = post_n(url, requests, c)
            ir = cg.dump()
            out[f"c{c}"] = {
                "requests": requests,
                "non_2xx": bad,
                "wall_s": round(wall, 2),
                "instructions": ir,
                "k_instructions_per_req": round(max(ir - idle_rate * wall, 0) / requests / 1000, 1),
            }
            print(f"  {v.name} c={c}: {out[f'c{c}']}", file=sys.stderr)
    finally:
        envoy.stop(timeout_s=60)
    return out


def instructions_table(res: dict[str, dict[str, Any]], conc: int) -> str:
    c = f"c{conc}"
    base = res.get("default")
    rows = [
        ("variant", "k instr/req c1", "vs default", f"k instr/req c{conc}", "vs default", "non-2xx")
    ]
    for name, r in res.items():
        if "error" in r:
            rows.append((name, "FAILED", "-", "-", "-", "-"))
            continue
        k1, kc = r["c1"]["k_instructions_per_req"], r[c]["k_instructions_per_req"]
        d1 = (
            f"{k1 - base['c1']['k_instructions_per_req']:+.1f}"
            if base and name != "default"
            else "-"
        )
        dc = f"{kc - base[c]['k_instructions_per_req']:+.1f}" if base and name != "default" else "-"
        rows.append(
            (name, f"{k1:.1f}", d1, f"{kc:.1f}", dc, str(r["c1"]["non_2xx"] + r[c]["non_2xx"]))
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)) for row in rows
    )


# -- aggregation and report ------------------------------------------------------------

_MEDIAN_KEYS = (
    "rps",
    "p50_ms",
    "p99_ms",
    "non_2xx",
    "envoy_cpu_ms_per_req",
    "envoy_user_ms_per_req",
    "envoy_sys_ms_per_req",
    "envoy_syscalls_per_req",
    "envoy_ctx_switches_per_req",
    "stub_cpu_ms_per_req",
    "backends_cpu_ms_per_req",
    "wrk_cpu_ms_per_req",
    "envoy_cores",
    "envoy_worker_busiest_cores",
    "envoy_worker_ceiling_rps",
    "stub_cores",
    "machine_busy_cores",
    "other_cores",
)


def _median(values: list[float]) -> float:
    return round(statistics.median(values), 4) if values else 0.0


def summarize(
    rounds: dict[str, list[dict[str, Any]]], concurrency: int
) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    alone = {r["round"]: r for r in rounds.get("alone", [])}
    for name, runs in rounds.items():
        if not runs:
            continue
        s: dict[str, Any] = {"rounds": len(runs)}
        for conc in ("c1", f"c{concurrency}"):
            s[conc] = {k: _median([r[conc][k] for r in runs if k in r[conc]]) for k in _MEDIAN_KEYS}
            # Per thread name: the median over rounds.
            names = {n for r in runs for n in r[conc]["envoy_threads_cores"]}
            s[conc]["envoy_threads_cores"] = {
                n: _median([r[conc]["envoy_threads_cores"].get(n, 0.0) for r in runs])
                for n in sorted(names)
            }
        # The round the machine's other load disturbed least (a shared machine).
        c = f"c{concurrency}"
        quiet = min(runs, key=lambda r: r[c]["other_cores"])
        s["quietest_round"] = {
            "round": quiet["round"],
            "other_cores": quiet[c]["other_cores"],
            **{
                k: quiet[c][k]
                for k in ("rps", "p50_ms", "envoy_cpu_ms_per_req", "envoy_worker_busiest_cores")
            },
        }
        if alone and name != "alone":
            # Added latency against the baseline of the same round.
            s["added_p50_ms_c1"] = _median(
                [
                    r["c1"]["p50_ms"] - alone[r["round"]]["c1"]["p50_ms"]
                    for r in runs
                    if r["round"] in alone
                ]
            )
        out[name] = s
    base = out.get("default")
    if base:
        c = f"c{concurrency}"
        for name, s in out.items():
            if name in ("default", "alone"):
                continue
            s["vs_default"] = {
                "envoy_cpu_ms_per_req": round(
                    s[c]["envoy_cpu_ms_per_req"] - base[c]["envoy_cpu_ms_per_req"], 4
                ),
                "rps_ratio": round(s[c]["rps"] / max(base[c]["rps"], 1e-9), 3),
            }
    return out


def table(summary: dict[str, dict[str, Any]], concurrency: int) -> str:
    c = f"c{concurrency}"
    rows = [
        (
            "variant", "c1 req/s", "c1 p50", "+p50", f"c{concurrency} req/s", "p50", "p99",
            "Envoy ms/req", "vs default", "usr", "sys", "syscalls", "ceiling", "stub", "backends", "wrk", "worker", "machine", "other",
        )
    ]  # fmt: skip
    for name, s in summary.items():
        r1, rc = s["c1"], s[c]
        vs = s.get("vs_default", {}).get("envoy_cpu_ms_per_req")
        rows.append(
            (
                name,
                f"{r1['rps']:.0f}",
                f"{r1['p50_ms']:.3f}",
                f"{s['added_p50_ms_c1']:+.3f}" if "added_p50_ms_c1" in s else "-",
                f"{rc['rps']:.0f}",
                f"{rc['p50_ms']:.2f}",
                f"{rc['p99_ms']:.2f}",
                f"{rc['envoy_cpu_ms_per_req']:.3f}",
                f"{vs:+.3f}" if vs is not None else "-",
                f"{rc['envoy_user_ms_per_req']:.3f}",
                f"{rc['envoy_sys_ms_per_req']:.3f}",
                f"{rc['envoy_syscalls_per_req']:.1f}",
                f"{rc['envoy_worker_ceiling_rps']:.0f}",
                f"{rc['stub_cpu_ms_per_req']:.3f}",
                f"{rc['backends_cpu_ms_per_req']:.3f}",
                f"{rc['wrk_cpu_ms_per_req']:.3f}",
                f"{rc['envoy_worker_busiest_cores']:.2f}",
                f"{rc['machine_busy_cores']:.2f}",
                f"{rc['other_cores']:.2f}",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(lines)


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--endpoints", type=int, default=16)
    ap.add_argument("--duration", type=int, default=5, help="seconds per measured run")
    ap.add_argument("--warmup", type=int, default=1, help="seconds (wrk takes whole seconds)")
    ap.add_argument("--concurrency", type=int, default=64, help="throughput run concurrency")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved rounds (medians)")
    ap.add_argument(
        "--variants",
        default="",
        help="comma-separated variant names (default: all; alone and default are always run)",
    )
    ap.add_argument("--list", action="store_true", help="list the variants and exit")
    ap.add_argument(
        "--instructions",
        type=int,
        default=0,
        metavar="N",
        help="instead of timing: count Envoy's instructions per request under callgrind "
        "(N requests per measurement; slow, but a busy machine does not move it)",
    )
    ap.add_argument(
        "--ir-concurrency", type=int, default=8, help="second concurrency of --instructions"
    )
    ap.add_argument("--stub-binary", type=Path, help="a prebuilt go_stub (default: build it)")
    ap.add_argument("--json", type=Path, help="also write the JSON result here")
    args = ap.parse_args()

    if args.list:
        for v in VARIANTS:
            print(f"{v.name:20} {v.doc}")
        return 0
    by_name = {v.name: v for v in VARIANTS}
    wanted = [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in by_name]
    if unknown:
        print(f"--variants: unknown {unknown}; see --list", file=sys.stderr)
        return 2
    names = ["alone", "default", *[n for n in wanted if n not in ("alone", "default")]]
    variants = [by_name[n] for n in names] if wanted else list(VARIANTS)

    wrk = shutil.which("wrk")
    if not wrk:
        print("wrk is not installed: run `apt-get install -y wrk`", file=sys.stderr)
        return 2
    envoy_bin = find_envoy()
    if not envoy_bin:
        print("Envoy is not installed: run scripts/bootstrap", file=sys.stderr)
        return 2
    stub_bin = args.stub_binary or build_stub()

    tmp = Path(tempfile.mkdtemp(prefix="pdroute-knobs-"))
    script = tmp / "post.lua"
    script.write_text(
        'wrk.method = "POST"\n'
        f"wrk.body = '{eo.BODY.decode()}'\n"
        'wrk.headers["Content-Type"] = "application/json"\n'
    )
    ports = [free_port() for _ in range(args.endpoints)]
    pool = [f"127.0.0.1:{p}" for p in ports]
    procs: list[subprocess.Popen[Any]] = []
    rounds: dict[str, list[dict[str, Any]]] = {v.name: [] for v in variants}
    errors: dict[str, str] = {}
    ir: dict[str, dict[str, Any]] = {}
    result: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "envoy": envoy_bin, "loadavg_start": loadavg()},
        "config": {
            "endpoints": args.endpoints,
            "duration_s": args.duration,
            "concurrency": [1, args.concurrency],
            "repeats": args.repeats,
            "request_body_bytes": len(eo.BODY),
            "load_generator": "wrk -t1",
            "ext_proc_server": "go_stub (grpc-go, round robin)",
            "variants": {v.name: v.doc for v in variants},
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
                str(eo.METRICS_CAPTURE),
            ],
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        procs.append(backend)
        eo.wait_line(backend, "ready", 20)
        stubs: dict[tuple[tuple[str, str], ...], tuple[int, int]] = {}
        for env in dict.fromkeys(v.stub_env for v in variants):
            stub, stub_port = start_stub(stub_bin, pool, env)
            procs.append(stub)
            stubs[env] = (stub.pid, stub_port)
        ctx = Ctx(
            envoy_bin=envoy_bin,
            pool=pool,
            stubs=stubs,
            backend_pid=backend.pid,
            wrk=wrk,
            script=script,
            tmp=tmp,
            duration=args.duration,
            warmup=args.warmup,
            concurrency=args.concurrency,
        )
        if args.instructions:
            for v in variants:
                try:
                    ir[v.name] = count_variant(v, ctx, args.instructions, args.ir_concurrency)
                except (RuntimeError, TimeoutError, subprocess.CalledProcessError) as exc:
                    ir[v.name] = {"error": str(exc)[-600:]}
                    print(f"  {v.name}: FAILED {ir[v.name]['error']}", file=sys.stderr)
        else:
            for rnd in range(args.repeats):
                print(f"round {rnd + 1}/{args.repeats}, load average {loadavg()}", file=sys.stderr)
                for v in variants:
                    try:
                        run = run_variant(v, ctx, rnd)
                    except (RuntimeError, TimeoutError, subprocess.CalledProcessError) as exc:
                        # A variant Envoy refuses (or that breaks the traffic) is a finding,
                        # not a reason to lose the others.
                        errors[v.name] = str(exc)[-600:]
                        print(f"  [{rnd}] {v.name}: FAILED {errors[v.name]}", file=sys.stderr)
                        continue
                    run["round"] = rnd
                    rounds[v.name].append(run)
    finally:
        for p in reversed(procs):
            eo.stop(p)
        shutil.rmtree(tmp, ignore_errors=True)

    result["machine"]["loadavg_end"] = loadavg()
    if args.instructions:
        result["config"]["method"] = (
            f"callgrind instruction counts of the Envoy process, {args.instructions} requests "
            f"per measurement, net of the idle rate (health checks, timers)"
        )
        result["instructions"] = ir
        print(instructions_table(ir, args.ir_concurrency))
        doc = orjson.dumps(result, option=orjson.OPT_INDENT_2).decode()
        print(doc)
        if args.json:
            args.json.write_text(doc + "\n")
        return 0
    summary = summarize(rounds, args.concurrency)
    result["summary"] = summary
    result["errors"] = errors
    result["rounds"] = rounds
    print(table(summary, args.concurrency))
    for name, err in errors.items():
        print(f"{name}: FAILED: {err.splitlines()[-1] if err else ''}")
    if "default" in summary:
        d = summary["default"]
        print(
            f"floor (Envoy + Go stub, default bootstrap): c={args.concurrency} "
            f"{d[f'c{args.concurrency}']['rps']:.0f} req/s, added p50 at c=1 "
            f"{d.get('added_p50_ms_c1', 0):.3f} ms; load average "
            f"{result['machine']['loadavg_start']} -> {result['machine']['loadavg_end']}"
        )
    doc = orjson.dumps(result, option=orjson.OPT_INDENT_2).decode()
    print(doc)
    if args.json:
        args.json.write_text(doc + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
