"""``pdroute sim``: run N simulated vLLM servers in one process.

Example: ``pdroute sim --replicas 16 --port 8000 --model llama --profile llama-3.1-8b-h100
--kv-events-endpoint 'tcp://*:5557'`` serves replicas on 8000..8015 publishing KV events on
5557..5572. Prints one JSON line with the bound ports once listening, then runs until
SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys

import orjson

from pdroute.sim.config import FAILURE_TYPES, ROLES, SimConfig, parse_lora_modules
from pdroute.sim.fleet import SimFleet
from pdroute.sim.latency import PROFILES, get_profile


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1)")
    p.add_argument(
        "--port",
        type=int,
        default=8000,
        help="first HTTP port; replica i uses port+i (0 = ephemeral)",
    )
    p.add_argument(
        "--advertise-host", default=None, help="host name peers use to reach these servers"
    )
    p.add_argument("--replicas", type=int, default=1, help="servers hosted by this process")
    p.add_argument("--model", default="sim-model", help="served model name")
    p.add_argument("--profile", default="fast", choices=sorted(PROFILES), help="latency profile")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--num-blocks", type=int, default=8192, help="KV cache capacity in blocks")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-model-len", type=int, default=32768)
    p.add_argument(
        "--max-waiting", type=int, default=10_000, help="waiting-queue bound (503 beyond)"
    )
    p.add_argument(
        "--prefix-caching-hash-algo", default="sha256", choices=["sha256", "sha256_cbor"]
    )
    p.add_argument("--hash-seed", default=None, help="like PYTHONHASHSEED for vLLM's NONE_HASH")
    p.add_argument(
        "--kv-events-endpoint",
        default=None,
        help="ZMQ endpoint; {port}/{rank}/{host} substituted, else TCP port + rank",
    )
    p.add_argument("--kv-events-topic", default="kv@{host}:{port}@{model}")
    p.add_argument("--replay-endpoint", default=None, help="ZMQ ROUTER replay endpoint (bound)")
    p.add_argument(
        "--role", default="both", choices=ROLES, help="P/D side: both|prefill|decode|none"
    )
    p.add_argument(
        "--side-channel-port",
        type=int,
        default=0,
        help="P/D side-channel base port (0 = ephemeral)",
    )
    p.add_argument(
        "--kv-bytes-per-block", type=int, default=4096, help="synthetic KV bytes sent per block"
    )
    p.add_argument(
        "--lease-seconds",
        type=float,
        default=480.0,
        help="how long prefill blocks are held for a pull",
    )
    p.add_argument(
        "--transfer-timeout", type=float, default=5.0, help="KV pull timeout before HTTP 500"
    )
    p.add_argument(
        "--kv-transport",
        default="auto",
        choices=["auto", "tcp", "nixl"],
        help="P/D data plane: NIXL READ when importable (auto), or always TCP / NIXL",
    )
    p.add_argument(
        "--failure-rate", type=float, default=0.0, help="fraction of requests failed on purpose"
    )
    p.add_argument(
        "--failure-types", default=",".join(FAILURE_TYPES), help="comma list of injected failures"
    )
    p.add_argument("--lora-modules", nargs="*", default=[], help="name=path or JSON (vLLM syntax)")
    p.add_argument("--max-loras", type=int, default=1)
    p.add_argument(
        "--enable-lora", action="store_true", help="LoRA on (runtime load/unload endpoints)"
    )
    p.add_argument("--seed", type=int, default=0)  # fmt: skip


def config_from_args(a: argparse.Namespace) -> SimConfig:
    cfg = SimConfig(
        model=a.model,
        host=a.host,
        port=a.port,
        advertise_host=a.advertise_host,
        profile=get_profile(a.profile),
        block_size=a.block_size,
        num_blocks=a.num_blocks,
        max_num_seqs=a.max_num_seqs,
        max_model_len=a.max_model_len,
        max_waiting=a.max_waiting,
        hash_algo=a.prefix_caching_hash_algo,
        hash_seed=a.hash_seed,
        kv_events_endpoint=a.kv_events_endpoint,
        kv_events_topic=a.kv_events_topic,
        replay_endpoint=a.replay_endpoint,
        role=a.role,
        side_channel_port=a.side_channel_port,
        kv_bytes_per_block=a.kv_bytes_per_block,
        lease_seconds=a.lease_seconds,
        transfer_timeout=a.transfer_timeout,
        kv_transport=a.kv_transport,
        failure_rate=a.failure_rate,
        failure_types=tuple(t for t in a.failure_types.split(",") if t),
        lora_modules=parse_lora_modules(a.lora_modules),
        max_loras=a.max_loras,
        enable_lora=a.enable_lora,
        seed=a.seed,
    )
    cfg.validate()
    return cfg


async def serve(cfg: SimConfig, replicas: int) -> None:
    fleet = SimFleet(cfg, replicas)
    await fleet.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    info = {
        "ports": fleet.ports,
        "addresses": fleet.addresses,
        "side_channel_ports": fleet.side_channel_ports,
        "kv_event_endpoints": fleet.kv_event_endpoints,
    }
    sys.stdout.write(orjson.dumps(info).decode() + "\n")
    sys.stdout.flush()
    try:
        await stop.wait()
    finally:
        await fleet.stop()


def run(args: argparse.Namespace) -> int:
    try:
        cfg = config_from_args(args)
    except ValueError as e:
        sys.stderr.write(f"pdroute sim: {e}\n")
        return 2
    if args.replicas < 1:
        sys.stderr.write("pdroute sim: --replicas must be >= 1\n")
        return 2
    try:
        try:
            import uvloop
        except ImportError:  # pragma: no cover - uvloop missing on this platform
            asyncio.run(serve(cfg, args.replicas))
        else:
            uvloop.run(serve(cfg, args.replicas))
    except (RuntimeError, OSError) as e:  # e.g. port in use, NIXL requested but missing
        sys.stderr.write(f"pdroute sim: {e}\n")
        return 1
    return 0
