"""The routers under comparison ("arms") and the fleet each one fronts.

Every arm gets a fresh fleet of simulated vLLM servers (one process per server,
same :class:`~pdroute.bench.workloads.FleetSpec`, same seeds), so caches start cold
and no arm inherits another's KV state. Then the arm's router:

``pdroute``
    The local stack of ``pdroute up`` (:class:`pdroute.stack.cmd.Stack`): Envoy with
    ext_proc to the EPP, with the EPP's built-in default EndpointPickerConfig
    (``epp/config/default-config.yaml``; ``--epp-config`` replaces it). Only the
    simulators' flags differ from ``pdroute up`` (KV capacity, batch size).
``pdroute-pd``
    The same stack with ``prefill`` of the fleet's servers turned into prefill
    servers (same total server count) and the P/D sidecars in front of decode.
``pdroute-precise``
    The stack with the precise prefix-cache producer fed by the simulators' KV events:
    the EPP binds one ZMQ address (``kvEventsConfig.zmqEndpoint``) and every
    simulator's publisher connects to it, as in llm-d's deployments.
``round-robin``
    Envoy alone: a STATIC cluster over the fleet with ``lb_policy: ROUND_ROBIN``, no
    ext_proc (rendered from :func:`pdroute.stack.envoy.render_bootstrap`).
``vllm-router`` / ``vllm-router-rr``
    PyPI ``vllm-router`` (Rust) with ``--policy cache_aware`` / ``round_robin``.
``sglang-router``
    PyPI ``sglang-router`` (Rust) with ``--policy cache_aware``.

Peer routers live in their own virtual environments under
``$PDROUTE_CACHE/peers/<package>-<version>`` (created with uv on first use, never in
the project's .venv). An arm that cannot be installed or started raises
:class:`ArmFailed` with the reason; the runner records it, it is never dropped.

"Router CPU" is the user+system CPU time of the processes that do the routing
(Envoy and the EPP, plus the sidecars for P/D; Envoy for round robin; the router
process for the peers), read from ``/proc/<pid>/stat``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import aiohttp
import orjson
import yaml

from epp.config import DEFAULT_CONFIG_PATH
from pdroute.bench.workloads import FleetSpec
from pdroute.stack.cmd import Plan, Stack, make_plan
from pdroute.stack.cmd import add_arguments as stack_arguments
from pdroute.stack.envoy import EnvoyOptions, envoy_argv, find_envoy, render_bootstrap
from pdroute.stack.procs import Child, StackError, port_is_free, tail

ARMS = (
    "pdroute",
    "pdroute-pd",
    "pdroute-precise",
    "round-robin",
    "vllm-router",
    "vllm-router-rr",
    "sglang-router",
)
#: Arms that need prefill servers (run only on the P/D workload).
PD_ARMS = ("pdroute-pd",)

PEERS: dict[str, tuple[str, str]] = {
    # arm -> (pip requirement, console script)
    "vllm-router": ("vllm-router==0.1.17", "vllm-router"),
    "vllm-router-rr": ("vllm-router==0.1.17", "vllm-router"),
    "sglang-router": ("sglang-router==0.3.2", "sglang-router"),
}
PEER_POLICY = {"vllm-router": "cache_aware", "vllm-router-rr": "round_robin"}
PEER_POLICY["sglang-router"] = "cache_aware"


class ArmFailed(Exception):
    """The arm could not be installed or started (the message says why)."""


def cache_dir() -> Path:
    return Path(os.environ.get("PDROUTE_CACHE", str(Path.home() / ".cache" / "pdroute")))


def peer_env(requirement: str) -> Path:
    name, _, version = requirement.partition("==")
    return cache_dir() / "peers" / f"{name}-{version}"


def ensure_peer(arm: str, *, install: bool = True) -> Path:
    """The console script of ``arm``'s router; installs it (uv) when missing."""
    requirement, script = PEERS[arm]
    env = peer_env(requirement)
    exe = env / "bin" / script
    if exe.exists():
        return exe
    if not install:
        raise ArmFailed(f"{requirement} not installed in {env} (run scripts/bootstrap)")
    uv = shutil.which("uv") or str(cache_dir() / "uv" / "bin" / "uv")
    if not os.access(uv, os.X_OK):
        raise ArmFailed(f"cannot install {requirement}: uv not found (run scripts/bootstrap)")
    envs = dict(os.environ)
    envs.pop("VIRTUAL_ENV", None)
    for argv in (
        [uv, "venv", "-q", "--python", sys.executable, str(env)],
        [uv, "pip", "install", "-q", "--python", str(env / "bin" / "python"), requirement],
    ):
        r = subprocess.run(argv, check=False, capture_output=True, text=True, env=envs, timeout=600)
        if r.returncode != 0:
            shutil.rmtree(env, ignore_errors=True)
            raise ArmFailed(f"installing {requirement} failed: {(r.stderr or r.stdout)[-500:]}")
    if not exe.exists():
        raise ArmFailed(f"{requirement} installed but {exe} is missing")
    return exe


def free_port_range(n: int, host: str = "127.0.0.1") -> int:
    """First port of ``n`` consecutive ports that are free right now."""
    rng = random.Random()
    # Below the kernel's ephemeral range (32768+ by default): client sockets of other
    # processes cannot take these ports between our check and the servers' bind.
    for _ in range(200):
        base = rng.randrange(20000, 32000 - n)
        if all(port_is_free(base + i, host) for i in range(n)):
            return base
    raise StackError(f"no {n} consecutive free ports found")


def cpu_seconds(pid: int) -> float | None:
    """user+system CPU seconds of ``pid`` (all its threads); None when gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    fields = data.rsplit(b")", 1)[1].split()
    # fields[0] is state (field 3); utime/stime are fields 14/15.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class ArmInfo:
    name: str
    base_url: str
    #: Routing processes (for router CPU): name -> pid.
    router_pids: dict[str, int] = field(default_factory=dict)
    #: Model servers that serve completions (decode side): host:port.
    endpoints: list[str] = field(default_factory=list)
    #: Every model server's /metrics (prefix-cache hits are counted over all).
    metrics_urls: list[str] = field(default_factory=list)
    run_dir: str = ""
    notes: str = ""
    #: The EPP's Prometheus endpoint (pdroute arms): saved after the run for diagnosis.
    epp_metrics_url: str = ""


def _stack_args(
    fleet: FleetSpec, run_dir: Path, model: str, *, prefill: int, config: Path | None
) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    stack_arguments(p)
    decode = fleet.decode - prefill
    n_ports = fleet.decode * 3 + 8
    argv = [
        "--decode",
        str(decode),
        "--prefill",
        str(prefill),
        "--model",
        model,
        "--profile",
        fleet.profile,
        "--base-port",
        str(free_port_range(n_ports)),
        "--port",
        "0",
        "--run-dir",
        str(run_dir),
        "--sim-processes",
        "per-server",
        "--ready-timeout",
        "60",
    ]
    if config is not None:
        argv += ["--config-file", str(config)]
    args = p.parse_args(argv)
    args.port = _free_port()
    return args


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class BenchStack(Stack):
    """``pdroute up``'s stack with the benchmark's simulator flags (KV capacity,
    batch size, KV events). Only :meth:`_start_sims` differs."""

    def __init__(self, plan: Plan, fleet: FleetSpec, *, kv_events: str | None = None) -> None:
        super().__init__(plan)
        self.fleet = fleet
        #: ZMQ address the EPP binds for KV events; every simulator connects to it.
        self.kv_events = kv_events

    def sim_argv(self, port: int, role: str, seed: int) -> list[str]:
        f, a = self.fleet, self.plan.args
        argv = [
            sys.executable,
            "-m",
            "pdroute.cli",
            "sim",
            "--port",
            str(port),
            "--replicas",
            "1",
            "--model",
            a.model,
            "--profile",
            f.profile,
            "--role",
            role,
            "--seed",
            str(seed),
            "--block-size",
            str(f.block_size),
            "--num-blocks",
            str(f.num_blocks),
            "--max-num-seqs",
            str(f.max_num_seqs),
            "--max-model-len",
            str(f.max_model_len),
        ]
        if self.kv_events:
            # A non-wildcard address: the simulator connects (as vLLM does), and the
            # topic kv@127.0.0.1:<port>@<model> tells the EPP which endpoint it is.
            argv += ["--kv-events-endpoint", self.kv_events]
        return argv

    async def _start_sims(self, http: aiohttp.ClientSession) -> None:
        plan = self.plan
        groups = [("decode", plan.decode_server_ports), ("prefill", plan.prefill_ports)]
        started: list[tuple[str, int, int, Child]] = []
        for role, ports in groups:
            for i, port in enumerate(ports):
                sim_role = role if plan.pd else "both"
                seed = i + (100 if role == "prefill" else 0)
                child = self.sup.start(f"sim-{role}-{i}", self.sim_argv(port, sim_role, seed))
                started.append((role, i, port, child))
        for role, i, port, child in started:
            await self._wait(
                http, child, [f"http://127.0.0.1:{port}/health"], plan.args.ready_timeout
            )
            self.components.append((f"{role}-{i} (simulated vLLM)", child, f"127.0.0.1:{port}"))

    async def start_sims_only(self) -> None:
        self.plan.run_dir.mkdir(parents=True, exist_ok=True)
        async with aiohttp.ClientSession() as http:
            await self._start_sims(http)


def default_config() -> str:
    """The ``pdroute`` arm's EPP config: the EPP's built-in default
    (``epp/config/default-config.yaml``), the configuration a user gets."""
    return DEFAULT_CONFIG_PATH.read_text()


def precise_config(fleet: FleetSpec, events_address: str) -> str:
    """EPP config of ``pdroute-precise``: the built-in default's scorers and weights
    with the precise prefix-cache producer (KV events) in place of the approximate one.

    The EPP binds ``events_address`` (``kvEventsConfig.zmqEndpoint``) and the
    simulators' publishers connect to it: llm-d's deployment shape ("bind stable,
    connect volatile"). Both sides connecting (the simulators to their own address,
    the EPP to the same one via ``discoverPods``) delivers nothing: that was why this
    arm used to see no KV events at all."""
    doc = yaml.safe_load(default_config())
    precise = {
        "type": "precise-prefix-cache-producer",
        "parameters": {
            "tokenProcessorConfig": {"blockSize": fleet.block_size},
            "kvEventsConfig": {"zmqEndpoint": events_address, "discoverPods": False},
            "speculativeIndexing": True,
        },
    }
    plugins: list[dict[str, Any]] = []
    for p in doc["plugins"]:
        if p["type"] == "approx-prefix-cache-producer":
            plugins.append(precise)
        elif p["type"] == "prefix-cache-scorer":
            params = {"prefixMatchInfoProducerName": "precise-prefix-cache-producer"}
            plugins.append({**p, "parameters": params})
        else:
            plugins.append(p)
    doc["plugins"] = plugins
    return yaml.safe_dump(doc, sort_keys=False)


async def probe_completion(
    base_url: str, model: str, timeout_s: float = 60.0, children: Sequence[Child] = ()
) -> None:
    """Wait until ``base_url`` answers a one-token completion with 200 three times in
    a row on fresh connections (a router can accept one request before its listener is
    settled); fails early when one of ``children`` exits."""
    deadline = time.monotonic() + timeout_s
    last = ""
    streak = 0
    body = orjson.dumps({"model": model, "prompt": "ready", "max_tokens": 1})
    conn = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=conn) as http:
        while time.monotonic() < deadline:
            for c in children:
                if not c.alive():
                    raise ArmFailed(
                        f"{c.name} exited with code {c.proc.returncode if c.proc else None}; "
                        f"last lines of {c.log_path}:\n{tail(c.log_path, 8)}"
                    )
            try:
                async with http.post(
                    base_url + "/completions",
                    data=body,
                    headers={"content-type": "application/json"},
                    timeout=aiohttp.ClientTimeout(total=5),
                ) as r:
                    if r.status == 200:
                        streak += 1
                        if streak >= 3:
                            return
                    else:
                        streak = 0
                        last = f"HTTP {r.status}: {(await r.read())[:200]!r}"
            except (aiohttp.ClientError, TimeoutError, OSError) as e:
                streak = 0
                last = f"{type(e).__name__}: {e}"
            await asyncio.sleep(0.25)
    raise ArmFailed(f"{base_url} not serving after {timeout_s:.0f}s ({last})")


class Arm:
    """One arm's fleet + router; ``async with Arm(...) as info`` starts and stops it."""

    def __init__(
        self,
        name: str,
        fleet: FleetSpec,
        run_dir: Path,
        model: str = "sim-model",
        *,
        epp_config: str | None = None,
    ):
        if name not in ARMS:
            raise ArmFailed(f"unknown arm {name!r}; known: {', '.join(ARMS)}")
        #: EndpointPickerConfig text for the ``pdroute`` arm instead of its default.
        self.epp_config = epp_config
        self.name = name
        self.fleet = fleet
        self.run_dir = run_dir
        self.model = model
        self.stack: BenchStack | None = None

    async def __aenter__(self) -> ArmInfo:
        try:
            return await self.start()
        except BaseException:
            self.stop()
            raise

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def stop(self) -> None:
        if self.stack is not None:
            self.stack.stop()

    async def start(self) -> ArmInfo:
        """Start the arm; a port taken between choosing and binding it is retried
        with fresh ports (twice)."""
        for attempt in range(3):
            try:
                return await self._start_once()
            except ArmFailed as e:
                if "already in use" not in str(e) or attempt == 2:
                    raise
                self.stop()
        raise AssertionError("unreachable")

    async def _start_once(self) -> ArmInfo:
        name, fleet = self.name, self.fleet
        self.run_dir.mkdir(parents=True, exist_ok=True)
        # The stack keeps an existing endpoints file; one left by an earlier attempt
        # (or an earlier run into the same directory) names other ports, and the EPP
        # would then route blind (it cannot scrape any endpoint).
        (self.run_dir / "endpoints.yaml").unlink(missing_ok=True)
        pd = name in PD_ARMS
        if pd and fleet.prefill < 1:
            raise ArmFailed(f"{name} needs prefill servers (only on the pd workload)")
        prefill = fleet.prefill if pd else 0
        if prefill >= fleet.decode:
            raise ArmFailed(f"{name}: prefill ({prefill}) must be below the server count")
        config: Path | None = None
        events = f"tcp://127.0.0.1:{_free_port()}" if name == "pdroute-precise" else None
        if events is not None:
            config = self.run_dir / "epp-precise.yaml"
            config.write_text(precise_config(fleet, events))
        elif name == "pdroute":
            config = self.run_dir / "epp-config.yaml"
            config.write_text(self.epp_config if self.epp_config is not None else default_config())
        args = _stack_args(fleet, self.run_dir, self.model, prefill=prefill, config=config)
        plan = make_plan(args)
        self.stack = stack = BenchStack(plan, fleet, kv_events=events)
        try:
            if name.startswith("pdroute"):
                await stack.start()
                pids: dict[str, int | None] = {
                    c.name: c.pid
                    for _, c, _ in stack.components
                    if c.pid and (c.name in ("envoy", "epp") or c.name.startswith("sidecar"))
                }
                base_url = f"http://127.0.0.1:{args.port}/v1"
            else:
                await stack.start_sims_only()
                base_url, pids = self._start_router(stack, args.port)
            await probe_completion(base_url, self.model, children=stack.sup.children)
        except StackError as e:
            raise ArmFailed(str(e)) from None
        decode_ports = plan.decode_server_ports
        all_ports = plan.decode_server_ports + plan.prefill_ports
        return ArmInfo(
            name=name,
            base_url=base_url,
            router_pids={k: v for k, v in pids.items() if v},
            endpoints=[f"127.0.0.1:{p}" for p in decode_ports],
            metrics_urls=[f"http://127.0.0.1:{p}/metrics" for p in all_ports],
            run_dir=str(self.run_dir),
            epp_metrics_url=(
                f"http://127.0.0.1:{plan.epp_metrics}/metrics" if name.startswith("pdroute") else ""
            ),
        )

    def _start_router(self, stack: BenchStack, port: int) -> tuple[str, dict[str, int | None]]:
        urls = [f"http://127.0.0.1:{p}" for p in stack.plan.decode_server_ports]
        if self.name == "round-robin":
            envoy = find_envoy()
            if not envoy or not os.access(envoy, os.X_OK):
                raise ArmFailed("Envoy not found: run scripts/bootstrap (or set $PDROUTE_ENVOY)")
            cfg = self.run_dir / "envoy-rr.yaml"
            cfg.write_text(yaml.safe_dump(round_robin_bootstrap(stack.plan, port), sort_keys=False))
            child = stack.sup.start("envoy", envoy_argv(envoy, str(cfg)))
            return f"http://127.0.0.1:{port}/v1", {"envoy": child.pid}
        exe = ensure_peer(self.name)
        sub = ["launch"] if self.name == "sglang-router" else []
        argv = [str(exe), *sub, "--host", "127.0.0.1", "--port", str(port), "--worker-urls", *urls]
        argv += ["--policy", PEER_POLICY[self.name], "--prometheus-port", str(_free_port())]
        argv += ["--prometheus-host", "127.0.0.1", "--log-level", "warn"]
        if self.name.startswith("vllm-router"):
            argv[-1] = "warning"
        child = stack.sup.start(self.name, argv)
        return f"http://127.0.0.1:{port}/v1", {self.name: child.pid}


def round_robin_bootstrap(plan: Plan, port: int) -> dict[str, Any]:
    """Envoy alone over the fleet: STATIC cluster, ``lb_policy: ROUND_ROBIN``."""
    opts = EnvoyOptions(
        listen_port=port,
        admin_port=plan.envoy_admin,
        epp_port=plan.epp_grpc,
        pool=[f"127.0.0.1:{p}" for p in plan.decode_server_ports],
        epp_enabled=False,
        num_retries=0,
    )
    boot = render_bootstrap(opts)
    for c in boot["static_resources"]["clusters"]:
        if c["name"] == "inference_pool":
            c.pop("load_balancing_policy", None)
            c["lb_policy"] = "ROUND_ROBIN"
    return boot
