"""Per-request CPU of the EPP below the transport: ``StreamHandler.run`` in process.

No gRPC, no network: each request is one ``StreamHandler.run(read, write, eof)``
call fed the ext_proc ``ProcessingRequest`` messages Envoy sends for one HTTP
request (``FULL_DUPLEX_STREAMED`` request body, ``response_body_mode: NONE``):

1. request headers (pseudo-headers plus ~10 typical client/Envoy headers,
   ``protocol_config``), held by the handler until the body is complete;
2. one request body chunk with ``end_of_stream``;
3. response headers with ``:status``, the ``upstream.address`` attribute and
   ``envoy.lb`` served-endpoint metadata.

The handler, director, datastore and endpoint source are built by
``epp.cmd._build`` from ``pdroute epp`` arguments (built-in default config, a
static endpoints file with 16 endpoints, no TLS; ``--config-file`` to pin another
config), i.e. exactly as the server builds
them; the datastore gets fresh metrics for all endpoints, refreshed every 100 ms
(as the scraper would, outside the timed region).

Scenarios:

* ``floor``: the same handler over a director that returns a constant decision
  (what the stream handler itself costs; everything else is "below the handler");
* ``small``: ``/v1/completions`` with a ~200-byte JSON body;
* ``chat-2k``: ``/v1/chat/completions`` with a ~2k-token prompt (8 shared system
  prompts, varying user turn: the prefix index is warm, as in production).

Reported per scenario: CPU microseconds per request (process CPU over the timed
loop / N, median of interleaved rounds; plus p50/p99 of per-request thread CPU), printed as JSON then a table.
``--profile`` adds a cProfile top-30 by tottime per scenario.

Usage: ``.venv/bin/python benchmarks/epp/handler_profile.py [--requests N]
[--scenario NAME ...] [--profile] [--json-only]``

Instruction counts (deterministic, unlike CPU time on a shared machine):
``--callgrind N`` runs N requests per scenario, each scenario inside one
``functools.reduce`` call, and nothing else; run it under

    valgrind --tool=callgrind --collect-atstart=no --toggle-collect=functools_reduce \
      --dump-after=functools_reduce --callgrind-out-file=/tmp/hp.cg \
      .venv/bin/python benchmarks/epp/handler_profile.py --callgrind 200

and read ``summary:`` of each dump ``/tmp/hp.cg.<k>`` with ``desc: Trigger:
--dump-after`` (in ``part:`` order, one per scenario as listed): instructions
per request = summary / N; "below handler" = scenario - floor.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import functools
import gc
import io
import os
import platform
import pstats
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from scheduling_latency import words  # type: ignore[import-not-found]  # this script's folder

from epp.datastore import Datastore, EndpointMetrics
from epp.handlers import StreamHandler
from epp.requestcontrol.api import IncomingRequest, ResponseInfo

ENDPOINTS = 16
Mode = processing_mode_pb2.ProcessingMode
SCENARIOS = ("floor", "small", "chat-2k")


# -- the pdroute epp wiring ---------------------------------------------------------


def endpoints_yaml() -> str:
    lines = ["endpoints:"]
    for i in range(ENDPOINTS):
        lines += [f"  - name: vllm-{i}", f"    address: 10.0.0.{10 + i}", "    port: 8000"]
    return "\n".join(lines) + "\n"


def build_parts(tmpdir: str, config_file: str | None = None) -> dict[str, Any]:
    """``epp.cmd._build`` for ``pdroute epp --endpoints FILE --no-secure-serving
    [--config-file FILE]``."""
    from epp import cmd

    path = os.path.join(tmpdir, "endpoints.yaml")
    with open(path, "w", encoding="utf-8") as f:
        f.write(endpoints_yaml())
    ap = argparse.ArgumentParser()
    cmd.add_arguments(ap)
    argv = ["--endpoints", path, "--no-secure-serving"]
    if config_file:
        argv += ["--config-file", config_file]
    args = ap.parse_args(argv)
    parts = cmd._build(args)
    datastore: Datastore = parts["datastore"]
    datastore.replace_endpoints(parts["source"].load())
    return parts


def refresh_metrics(datastore: Datastore, rng: random.Random) -> None:
    """What one scrape round does to the datastore: fresh metrics for every endpoint."""
    now = datastore.clock()
    for ep in datastore.endpoints():
        datastore.update_metrics(
            ep.key,
            EndpointMetrics(
                waiting=rng.randint(0, 4),
                running=rng.randint(0, 16),
                kv_cache_usage=round(rng.random() * 0.8, 3),
                updated_at=now,
            ),
        )


# -- ext_proc messages ----------------------------------------------------------------


def _header_map(headers: Mapping[str, str]) -> base_pb2.HeaderMap:
    return base_pb2.HeaderMap(
        headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in headers.items()]
    )


def request_headers_msg(path: str, body_len: int, rid: str) -> pb.ProcessingRequest:
    headers = {
        ":authority": "gateway.example.com",
        ":path": path,
        ":method": "POST",
        ":scheme": "http",
        "content-type": "application/json",
        "content-length": str(body_len),
        "user-agent": "OpenAI/Python 1.54.0",
        "accept": "application/json",
        "accept-encoding": "gzip, deflate",
        "authorization": "Bearer sk-0123456789abcdef",
        "x-stainless-lang": "python",
        "x-stainless-retry-count": "0",
        "x-forwarded-proto": "http",
        "x-request-id": rid,
        "x-envoy-expected-rq-timeout-ms": "600000",
    }
    msg = pb.ProcessingRequest(request_headers=pb.HttpHeaders(headers=_header_map(headers)))
    msg.protocol_config.request_body_mode = Mode.FULL_DUPLEX_STREAMED  # type: ignore[assignment]
    msg.protocol_config.response_body_mode = Mode.NONE  # type: ignore[assignment]
    return msg


def body_msg(body: bytes) -> pb.ProcessingRequest:
    return pb.ProcessingRequest(request_body=pb.HttpBody(body=body, end_of_stream=True))


def response_headers_msg(served: str) -> pb.ProcessingRequest:
    headers = {
        ":status": "200",
        "content-type": "application/json",
        "date": "Wed, 25 Nov 2026 15:00:00 GMT",
        "server": "uvicorn",
        "content-length": "512",
        "x-envoy-upstream-service-time": "12",
    }
    msg = pb.ProcessingRequest(
        response_headers=pb.HttpHeaders(headers=_header_map(headers), end_of_stream=False)
    )
    msg.metadata_context.filter_metadata["envoy.lb"].fields[
        "x-gateway-destination-endpoint-served"
    ].string_value = served
    msg.attributes["envoy.filters.http.ext_proc"].fields["upstream.address"].string_value = served
    return msg


def make_bodies(scenario: str, rng: random.Random, count: int) -> tuple[str, list[bytes]]:
    if scenario in ("floor", "small"):
        out = []
        for i in range(count):
            doc = {
                "model": "Qwen/Qwen2.5-0.5B-Instruct",
                "prompt": f"Write a haiku about request number {i} and the sea.",
                "max_tokens": 32,
                "temperature": 0.7,
                "stream": False,
            }
            out.append(orjson.dumps(doc))
        return "/v1/completions", out
    # ~2k tokens at 4 chars/token: 3/4 shared system prompt, 1/4 varying question.
    systems = [words(rng, 6000) for _ in range(8)]
    out = []
    for _ in range(count):
        messages = [
            {"role": "system", "content": rng.choice(systems)},
            {"role": "user", "content": words(rng, 2000)},
        ]
        doc = {"model": "Qwen/Qwen2.5-0.5B-Instruct", "messages": messages, "max_tokens": 64}
        out.append(orjson.dumps(doc))
    return "/v1/chat/completions", out


@dataclass
class _ConstDecision:
    endpoints: list[str]
    model: str = "Qwen/Qwen2.5-0.5B-Instruct"
    set_headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes | None = None

    def response_headers(self, info: ResponseInfo) -> Mapping[str, str]:
        return {}

    def finish(self, info: ResponseInfo) -> None:
        return None


class _ConstDirector:
    """The cheapest possible director: what the stream handler costs on its own."""

    needs_response_body = False

    def __init__(self, endpoint: str) -> None:
        self._endpoint = endpoint

    async def route(self, request: IncomingRequest) -> _ConstDecision:
        return _ConstDecision([self._endpoint])

    def route_bodyless(self, request: IncomingRequest) -> _ConstDecision:
        return _ConstDecision([self._endpoint])

    def ready(self) -> bool:
        return True


# -- the run ----------------------------------------------------------------------------


class _Exchange:
    """One stream's reader and writer: Envoy's side of the conversation.

    The writer notes the routed endpoint; the reader then answers with response
    headers naming it as served (prebuilt per endpoint), as Envoy does.
    """

    __slots__ = ("i", "msgs", "rejected", "responses", "routed")

    def __init__(self, responses: dict[str, pb.ProcessingRequest]) -> None:
        self.responses = responses
        self.msgs: list[pb.ProcessingRequest] = []
        self.i = 0
        self.routed = ""
        self.rejected = 0

    def start(self, request_msgs: list[pb.ProcessingRequest]) -> None:
        self.msgs = request_msgs
        self.i = 0
        self.routed = ""

    async def read(self) -> Any:
        i = self.i
        self.i = i + 1
        if i < len(self.msgs):
            return self.msgs[i]
        if i == len(self.msgs) and self.routed:
            return self.responses[self.routed]
        return None

    async def write(self, resp: pb.ProcessingResponse) -> None:
        if resp.HasField("immediate_response"):
            self.rejected += 1
        elif not self.routed and resp.HasField("request_headers"):
            v = resp.dynamic_metadata.fields["envoy.lb"].struct_value.fields[
                "x-gateway-destination-endpoint"
            ]
            self.routed = v.string_value.split(",", 1)[0]


def plugin_totals() -> dict[str, tuple[float, float]]:
    """``extension point/type/name -> (calls, seconds)`` so far (the EPP's own
    ``llm_d_epp_plugin_duration_seconds`` histogram: wall time per plugin call)."""
    from epp.metrics import PLUGIN_DURATION

    out: dict[str, tuple[float, float]] = {}
    for fam in PLUGIN_DURATION.collect():
        for sm in fam.samples:
            if sm.name.endswith("_count") or sm.name.endswith("_sum"):
                lb = sm.labels
                k = f"{lb['extension_point']}/{lb['plugin_type']}"
                c, t = out.get(k, (0.0, 0.0))
                if sm.name.endswith("_count"):
                    out[k] = (c + sm.value, t)
                else:
                    out[k] = (c, t + sm.value)
    return out


class Scenario:
    """One scenario's wiring, messages and measurements (rounds are interleaved
    across scenarios, so background load on a shared machine hits all alike)."""

    def __init__(self, name: str, seed: int, config_file: str | None = None) -> None:
        self.name = name
        self.rng = random.Random(seed)
        with tempfile.TemporaryDirectory(prefix="pdroute-handler-profile-") as tmp:
            parts = build_parts(tmp, config_file)
        self.datastore: Datastore = parts["datastore"]
        self.handler: StreamHandler = parts["handler"]
        keys = [e.key for e in self.datastore.endpoints()]
        if name == "floor":
            self.handler = StreamHandler(_ConstDirector(keys[0]))
        refresh_metrics(self.datastore, self.rng)
        self.path, self.bodies = make_bodies(name, self.rng, 256)
        # Messages are built up front: parsing protobuf is the transport's cost.
        self.streams = [
            [request_headers_msg(self.path, len(b), f"req-{i:08d}"), body_msg(b)]
            for i, b in enumerate(self.bodies)
        ]
        self.ex = _Exchange({k: response_headers_msg(k) for k in keys})
        self.i = 0
        self.last_refresh = time.monotonic()
        self.per_req: list[int] = []
        self.round_us: list[float] = []
        self.prof = cProfile.Profile()
        #: plugin -> (calls, seconds) from llm_d_epp_plugin_duration_seconds, this scenario
        self.plugins: dict[str, tuple[float, float]] = {}

    async def one(self) -> None:
        ex = self.ex
        ex.start(self.streams[self.i % len(self.streams)])
        self.i += 1
        await self.handler.run(ex.read, ex.write, None)

    async def warm_up(self, n: int) -> None:
        """Caches, prefix index, metric children; checks that every request is routed."""
        for i in range(n):
            await self.one()
            if not self.ex.routed:
                raise SystemExit(f"{self.name}: warm-up request {i} was not routed")
        if self.ex.rejected:
            raise SystemExit(f"{self.name}: {self.ex.rejected} warm-up requests were rejected")

    async def round(self, n: int, profile: bool, refresh_every: int = 0) -> None:
        before = plugin_totals()
        await self._round(n, profile, refresh_every)
        for k, (c, t) in plugin_totals().items():
            c0, t0 = before.get(k, (0.0, 0.0))
            pc, pt = self.plugins.get(k, (0.0, 0.0))
            self.plugins[k] = (pc + c - c0, pt + t - t0)

    async def _round(self, n: int, profile: bool, refresh_every: int) -> None:
        thread_ns = time.thread_time_ns
        prof = self.prof if profile else None
        total = 0
        gc.collect()
        for _ in range(n):
            # The scraper's round (not timed): every 100 ms, or every N requests.
            if (
                self.i % refresh_every == 0
                if refresh_every
                else time.monotonic() - self.last_refresh >= 0.1
            ):
                refresh_metrics(self.datastore, self.rng)
                self.last_refresh = time.monotonic()
            if prof is not None:
                prof.enable()
            t0 = thread_ns()
            await self.one()
            d = thread_ns() - t0
            if prof is not None:
                prof.disable()
            self.per_req.append(d)
            total += d
        self.round_us.append(total / n / 1000)

    def result(self, profile: bool) -> dict[str, Any]:
        us = sorted(d / 1000 for d in self.per_req)
        out: dict[str, Any] = {
            "scenario": self.name,
            "path": self.path,
            "body_bytes_mean": round(statistics.fmean(len(b) for b in self.bodies)),
            "requests": len(us),
            # The median round: robust against bursts of load from other processes.
            "cpu_us_per_request": round(statistics.median(self.round_us), 1),
            # The quietest round: the best estimate on a machine shared with others.
            "cpu_us_min_round": round(min(self.round_us), 1),
            "cpu_us_rounds": [round(x, 1) for x in self.round_us],
            "p50_us": round(us[len(us) // 2], 1),
            "p99_us": round(us[min(len(us) - 1, int(len(us) * 0.99))], 1),
        }
        calls = max(1, len(us))
        out["plugin_us_per_request"] = {
            k: round(t / calls * 1e6, 1)
            for k, (c, t) in sorted(self.plugins.items(), key=lambda kv: -kv[1][1])
            if c
        }
        if profile:
            s = io.StringIO()
            pstats.Stats(self.prof, stream=s).sort_stats("tottime").print_stats(30)
            out["profile"] = s.getvalue()
        return out


async def main_async(args: argparse.Namespace) -> list[dict[str, Any]]:
    scenarios = [Scenario(name, args.seed, args.config_file) for name in args.scenario or SCENARIOS]
    for sc in scenarios:
        await sc.warm_up(args.warmup)
    if args.no_gc:
        gc.collect()
        gc.disable()  # deterministic instruction counts: no collection in the timed part
    per_round = max(1, args.requests // args.rounds)
    for _ in range(args.rounds):
        for sc in scenarios:
            n = per_round if sc.name != "chat-2k" else max(1, per_round // 2)
            await sc.round(n, args.profile, args.refresh_every)
    return [sc.result(args.profile) for sc in scenarios]


def callgrind_marks(args: argparse.Namespace) -> int:
    """``--callgrind N``: N requests per scenario, each scenario's inside one
    ``functools.reduce`` call (the callgrind toggle; see the module doc)."""
    loop = asyncio.new_event_loop()
    names = args.scenario or list(SCENARIOS)
    scenarios = [Scenario(name, args.seed, args.config_file) for name in names]
    for sc in scenarios:
        loop.run_until_complete(sc.warm_up(args.warmup))

    async def run(sc: Scenario, n: int) -> None:
        for i in range(n):
            if i % 100 == 0:  # a scrape round every 100 requests, as in --refresh-every 100
                refresh_metrics(sc.datastore, sc.rng)
            await sc.one()

    gc.collect()
    gc.disable()
    for sc in scenarios:

        def step(_acc: None, _i: int, sc: Scenario = sc) -> None:
            loop.run_until_complete(run(sc, args.callgrind))

        functools.reduce(step, range(1), None)
    gc.enable()
    loop.close()
    print("callgrind parts, in order: " + ", ".join(names))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--requests", type=int, default=5000, help="requests per scenario (5000)")
    ap.add_argument("--scenario", action="append", choices=SCENARIOS, help="repeatable")
    ap.add_argument("--rounds", type=int, default=20, help="interleaved rounds (20)")
    ap.add_argument("--warmup", type=int, default=300, help="untimed requests first (300)")
    ap.add_argument(
        "--refresh-every",
        type=int,
        default=0,
        metavar="N",
        help="refresh metrics every N requests instead of every 100 ms (deterministic runs)",
    )
    ap.add_argument(
        "--config-file",
        metavar="FILE",
        help="EndpointPickerConfig (default: the built-in default, as pdroute epp uses)",
    )
    ap.add_argument(
        "--no-gc",
        action="store_true",
        help="disable the cyclic GC after warm-up (for instruction counting: a full "
        "collection landing in one run but not another dwarfs small differences)",
    )
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--profile", action="store_true", help="cProfile top-30 by tottime")
    ap.add_argument("--json-only", action="store_true")
    ap.add_argument(
        "--callgrind",
        type=int,
        default=0,
        metavar="N",
        help="N requests per scenario inside functools.reduce, for instruction counts "
        "under valgrind (see the module doc); prints no timings",
    )
    args = ap.parse_args()
    if args.callgrind:
        return callgrind_marks(args)
    try:
        import uvloop

        results = uvloop.run(main_async(args))
    except ImportError:  # pragma: no cover
        results = asyncio.run(main_async(args))
    profiles = {r["scenario"]: r.pop("profile") for r in results if "profile" in r}
    floor = next((r["cpu_us_per_request"] for r in results if r["scenario"] == "floor"), None)
    floor_min = next((r["cpu_us_min_round"] for r in results if r["scenario"] == "floor"), 0.0)
    if floor is not None:
        for r in results:
            if r["scenario"] != "floor":
                r["below_handler_us"] = round(r["cpu_us_per_request"] - floor, 1)
                r["below_handler_min_us"] = round(r["cpu_us_min_round"] - floor_min, 1)
    doc = {
        "benchmark": "epp.handler_profile",
        "python": sys.version.split()[0],
        "machine": platform.machine(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "endpoints": ENDPOINTS,
        "config_file": args.config_file or "(built-in default)",
        "results": results,
    }
    sys.stdout.write(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode() + "\n")
    if not args.json_only:
        head = (
            f"{'scenario':9} {'body B':>7} {'N':>6} {'CPU us/req':>11} {'min round':>10} "
            f"{'p50 us':>8} {'p99 us':>8} {'below handler':>14} {'(min round)':>12}"
        )
        print(head)
        print("-" * len(head))
        for r in results:
            below = r.get("below_handler_us")
            below_min = r.get("below_handler_min_us")
            print(
                f"{r['scenario']:9} {r['body_bytes_mean']:>7} {r['requests']:>6} "
                f"{r['cpu_us_per_request']:>11.1f} {r['cpu_us_min_round']:>10.1f} "
                f"{r['p50_us']:>8.1f} {r['p99_us']:>8.1f} "
                f"{'-' if below is None else f'{below:.1f}':>14} "
                f"{'-' if below_min is None else f'{below_min:.1f}':>12}"
            )
        for r in results:
            plugins = r.get("plugin_us_per_request") or {}
            if plugins:
                print(f"\n{r['scenario']}: plugin wall time per request (us)")
                for k, v in plugins.items():
                    print(f"  {k:48} {v:8.1f}")
        for name, text in profiles.items():
            print(f"\n== cProfile ({name}), top 30 by tottime ==")
            print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
