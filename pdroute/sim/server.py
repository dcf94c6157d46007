"""One simulated vLLM server: HTTP API + engine loop + KV events + side channel.

Everything runs on the process's single event loop; many servers can share it
(:class:`pdroute.sim.fleet.SimFleet`). Each server drives its engine with one timer
(callbacks, no task): ``Engine.schedule`` plans a step, ``Engine.complete_step`` ends
it at exactly its planned time (virtual time on the loop's clock), so a server costs
O(running requests) per step rather than a timer per request; the timer only fires
when a client must see the engine (a streamed token, an admission, a finish) and
every other reader first catches the engine up (see "engine driver" below).

HTTP surface (vLLM 0.32 shapes): ``POST /v1/completions``, ``/v1/chat/completions``
(JSON or SSE with ``stream_options.include_usage``), ``/v1/responses``
(non-streaming), ``/tokenize``, ``/detokenize``; ``GET /v1/models``, ``/health``,
``/metrics``, ``/version``. Every response carries ``x-inference-served-by:
host:port``. The HTTP layer is :mod:`pdroute.sim.http` (asyncio + llhttp), chosen
for CPU per request: many servers share a process and a core.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import random
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from pdroute.protocol.blockhash import chain_block_hashes, hash_function
from pdroute.protocol.headers import SERVED_BY
from pdroute.sim import api
from pdroute.sim.config import SimConfig, substitute
from pdroute.sim.engine import Engine, QueueFull, RemoteSource, SimRequest
from pdroute.sim.hashmemo import memo_hash
from pdroute.sim.http import HttpServer, Request, Response, Stream
from pdroute.sim.kvcache import BlockPool
from pdroute.sim.kvevents import KVEventPublisher
from pdroute.sim.latency import LatencyModel
from pdroute.sim.metrics import (
    EngineStats,
    Gauges,
    SampleFilter,
    ServerMetrics,
    cache_config_labels,
)
from pdroute.sim.nixl_kv import NixlKV, nixl_available
from pdroute.sim.tokenizer import Tokenizer
from pdroute.sim.transfer import (
    LeaseView,
    SideChannelServer,
    TransferError,
    block_keys,
    pull_blocks,
)

log = logging.getLogger(__name__)

VLLM_VERSION = "0.32.0"
_DONE = b"data: [DONE]\n\n"
_MARK = "\ue000sim-text\ue000"  # a private-use marker where a chunk's text goes
_MARK_JSON = orjson.dumps(_MARK)
_TEXT = b"text/plain; charset=utf-8"
_SSE_HEADERS = ((b"cache-control", b"no-cache"),)
_NOT_FOUND = b'{"detail":"Not Found"}'
#: Largest request body accepted (HTTP 413 beyond).
MAX_BODY = 64 * 1024 * 1024

Route = Callable[[Request], Awaitable[Response | Stream]]


def _json(obj: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(obj), status)


def _sse(obj: Any) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


#: ``/metrics?name[]=`` filters, shared by the servers of a process.
_METRICS_FILTER = SampleFilter()


class SimServer:
    def __init__(self, config: SimConfig, rank: int = 0) -> None:
        config.validate()
        self.cfg = config
        self.rank = rank
        self.hash_fn = memo_hash(hash_function(config.hash_algo))
        self.tok = Tokenizer(config.vocab_size)
        self.stats = EngineStats()
        self.pool = BlockPool(config.num_blocks, config.block_size)
        self.latency = LatencyModel(config.profile, config.max_num_seqs, seed=config.seed + rank)
        self.loras = {m.name: i + 1 for i, m in enumerate(config.lora_modules)}
        self.lora_paths = {m.name: m.path for m in config.lora_modules}
        self._next_lora_id = len(self.loras) + 1
        self.engine = Engine(
            pool=self.pool,
            latency=self.latency,
            stats=self.stats,
            max_num_seqs=config.max_num_seqs,
            max_waiting=config.max_waiting,
            lease_seconds=config.lease_seconds,
            max_loras=config.max_loras if config.lora_enabled else 0,
            on_load=self._start_load,
            on_events=self._publish,
            tokenizer=self.tok,
            hash_fn=self.hash_fn,
            hash_seed=config.hash_seed,
        )
        self.engine_id = str(uuid.uuid4())
        self.host = config.host
        self.advertise_host = config.advertise_host or (
            "127.0.0.1" if config.host in ("0.0.0.0", "", "::") else config.host
        )
        self.port = 0
        self.serves_kv = config.role in ("both", "prefill")
        self.pulls_kv = config.role in ("both", "decode")
        self.side: SideChannelServer | None = None
        self.nixl: NixlKV | None = None
        #: Pulls whose bytes moved by NIXL READ (the rest went over the TCP side channel).
        self.nixl_reads = 0
        self.publisher: KVEventPublisher | None = None
        self.metrics = ServerMetrics(
            self.stats,
            self._gauges,
            model_name=config.model,
            cache_config=cache_config_labels(
                block_size=config.block_size,
                num_gpu_blocks=config.num_blocks,
                hash_algo=config.hash_algo,
                kv_bytes_per_token=config.profile.kv_bytes_per_token,
            ),
            max_loras=config.max_loras if config.lora_enabled else 0,
            nixl=config.role != "none",
        )
        self._rng = random.Random(config.seed * 7919 + rank)
        #: Engine driver state (callbacks on the event loop, no task; see _kick): a
        #: scheduling pass queued with call_soon, the one wake-up timer.
        self._loop: asyncio.AbstractEventLoop  # set by start()
        self._soon: asyncio.Handle | None = None
        self._timer: asyncio.TimerHandle | None = None
        #: End (loop clock) of the engine step in flight; None when the engine is idle.
        self._step_end: float | None = None
        #: Request ids: random, not secret (uuid4 costs a getrandom syscall per request).
        self._ids = random.Random()
        self._tasks: set[asyncio.Task[None]] = set()
        self._http: HttpServer | None = None
        self._routes = self._route_table()
        self._closing = False
        self._created = int(time.time())
        #: vLLM reports "vllm-<version>-<config hash>"; ours hashes the served config.
        digest = hashlib.sha256(
            f"{config.model}/{config.block_size}/{config.max_model_len}".encode()
        )
        self.fingerprint = f"vllm-{VLLM_VERSION}-{digest.hexdigest()[:8]}"

    # ---- lifecycle ------------------------------------------------------------------
    @property
    def address(self) -> str:
        return f"{self.advertise_host}:{self.port}"

    def _route_table(self) -> dict[tuple[str, str], Route]:
        return {
            ("POST", "/v1/completions"): self._completions,
            ("POST", "/v1/chat/completions"): self._chat,
            ("POST", "/v1/responses"): self._responses,
            ("POST", "/tokenize"): self._tokenize,
            ("POST", "/detokenize"): self._detokenize,
            # Simulator-only introspection (no vLLM equivalent): how much of a prompt this
            # server's KV cache holds right now. Benchmarks use it for an oracle router.
            ("POST", "/sim/cached_prefix"): self._cached_prefix,
            ("GET", "/v1/models"): self._models,
            ("POST", "/v1/load_lora_adapter"): self._load_lora,
            ("POST", "/v1/unload_lora_adapter"): self._unload_lora,
            ("GET", "/health"): self._health,
            ("GET", "/metrics"): self._metrics,
            ("GET", "/metrics/"): self._metrics,
            ("GET", "/version"): self._version,
        }

    async def _dispatch(self, request: Request) -> Response | Stream:
        method = "GET" if request.method == "HEAD" else request.method
        route = self._routes.get((method, request.path))
        if route is None:
            return Response(_NOT_FOUND, 404)
        return await route(request)

    async def start(self, port: int | None = None, side_channel_port: int | None = None) -> None:
        """Listen (HTTP, side channel, KV events) and start the engine loop."""
        try:
            await self._start(port, side_channel_port)
        except BaseException:
            await self.stop()
            raise

    async def _start(self, port: int | None, side_channel_port: int | None) -> None:
        self._loop = asyncio.get_running_loop()
        want = self.cfg.port + self.rank if self.cfg.port and port is None else (port or 0)
        self._http = HttpServer(self._dispatch, max_body=MAX_BODY)
        self.port = await self._http.start(self.host, want, backlog=1024)
        self._http.set_extra_headers(((SERVED_BY, self.address),))
        if (self.serves_kv or self.pulls_kv) and self._use_nixl():
            self.nixl = NixlKV(self.engine_id, self.cfg.num_blocks, self.cfg.kv_bytes_per_block)
        if self.serves_kv:
            self.side = SideChannelServer(
                nixl=self.nixl,
                engine_id=self.engine_id,
                block_bytes_size=self.cfg.kv_bytes_per_block,
                get_lease=self._lease_view,
                release=self._release_lease,
            )
            sp = side_channel_port
            if sp is None:
                sp = self.cfg.side_channel_port + self.rank if self.cfg.side_channel_port else 0
            await self.side.start(self.host, sp)
        if self.cfg.kv_events_endpoint:

            def fill(template: str) -> str:
                return substitute(
                    template,
                    rank=self.rank,
                    port=self.port,
                    host=self.advertise_host,
                    model=self.cfg.model,
                )

            topic = self.cfg.kv_events_topic
            self.publisher = KVEventPublisher(
                fill(self.cfg.kv_events_endpoint),
                fill(topic) if "{" in topic else topic,
                replay_endpoint=fill(self.cfg.replay_endpoint)
                if self.cfg.replay_endpoint
                else None,
                buffer_steps=self.cfg.replay_buffer_steps,
            )
            self.publisher.start()
        self._kick()

    def _use_nixl(self) -> bool:
        mode = self.cfg.kv_transport
        if mode == "tcp" or self.cfg.kv_bytes_per_block == 0:
            return False
        if nixl_available():
            return True
        if mode == "nixl":
            raise RuntimeError("sim config: kv_transport: 'nixl' but `import nixl._api` fails")
        return False

    async def stop(self) -> None:
        self._closing = True
        for h in (self._soon, self._timer):
            if h is not None:
                h.cancel()
        self._soon = self._timer = None
        for t in list(self._tasks):
            t.cancel()
        for t in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        if self._http is not None:
            await self._http.close()
        if self.side is not None:
            await self.side.close()
        if self.publisher is not None:
            await self.publisher.close()
        if self.nixl is not None:
            self.nixl.close()

    # ---- engine driver --------------------------------------------------------------
    # The engine runs in virtual time on the event loop's clock: a step scheduled at t
    # with duration d ends at exactly t + d, and the next step is scheduled at that
    # instant (event-loop lateness does not accumulate into the model's latencies).
    # The driver wakes (one timer, callbacks, no task) only when something outside the
    # engine must see it: at the end of every step while a request streams or waits for
    # admission, or when the profile has jitter or KV events are published; otherwise
    # at the end of the step that finishes the first running request (decode-only steps
    # of a jitter-free profile with enough free KV blocks cannot change which step that
    # is, nor its time). Before an arrival, an abort, a finished KV pull, a lease
    # release or a /metrics read, _sync() runs every step that ended since, in order,
    # each at its own end time: the same schedule / complete_step calls, with the same
    # times, as waking at every step.
    def _kick(self) -> None:
        """There may be new work: schedule it now (idle engine) or re-plan the wake-up."""
        if self._closing or self._soon is not None:
            return
        if self._step_end is None:
            self._soon = self._loop.call_soon(self._on_kick)
        else:
            self._arm()

    def _on_kick(self) -> None:
        self._soon = None
        self._on_timer()

    def _on_timer(self) -> None:
        if self._closing:
            return
        now = self._loop.time()
        self._sync(now)
        if self._step_end is None:  # idle: new work, or a lease expired
            dur = self.engine.schedule(now)
            if dur is not None:
                self._step_end = now + dur
        self._arm()

    def _sync(self, now: float | None = None) -> None:
        """Complete every step that ended by ``now``, scheduling the next at each end."""
        end = self._step_end
        if end is None:
            return
        t = self._loop.time() if now is None else now
        engine = self.engine
        while end is not None and end <= t:
            engine.complete_step(end)
            dur = engine.schedule(end)
            end = None if dur is None else end + dur
        self._step_end = end

    def _arm(self) -> None:
        """(Re)set the one timer: the next moment the engine must be looked at."""
        if self._timer is not None:
            self._timer.cancel()  # a no-op when it is the one that just fired
            self._timer = None
        if self._closing:
            return
        wake = self._step_end
        if wake is None:
            wake = self.engine.next_deadline()
            if wake is None:
                return
        else:
            wake += self._skippable()
        self._timer = self._loop.call_at(wake, self._on_timer)

    def _skippable(self) -> float:
        """Time of the decode steps after the one in flight that nobody needs to see."""
        e = self.engine
        if self.latency.profile.jitter > 0.0 or e.waiting or e.loaded or e.loading:
            return 0.0
        if self.publisher is not None:  # KV events go out at their step, not later
            return 0.0
        bs = self.pool.block_size
        steps = 0  # steps until the first request finishes, counting the one in flight
        blocks = 0  # blocks the running requests still allocate until they finish
        for r in e.running:
            if r.notify_tokens and r.listener is not None:
                return 0.0  # streaming: every token is seen
            limit = r.max_tokens if r.stop_after is None else min(r.max_tokens, r.stop_after)
            left = limit - len(r.output_ids)
            if steps == 0 or left < steps:
                steps = left
            blocks += -(-(r.num_prompt_tokens + limit) // bs) - len(r.block_ids)
        if steps <= 1 or blocks > self.pool.num_free:  # a preemption could come first
            return 0.0
        return (steps - 1) * self.latency.itl(len(e.running))

    def _submit(self, req: SimRequest) -> None:
        now = self._loop.time()
        self._sync(now)  # steps that ended before the arrival do not see it
        try:
            self.engine.add(req, now)
        except QueueFull:
            raise api.ApiError(503, "Scheduler waiting queue is full") from None
        except ValueError as e:
            raise api.ApiError(400, str(e)) from None
        self._kick()

    def _release_lease(self, lease_id: str) -> bool:
        self._sync()
        return self.engine.release_lease(lease_id)

    def _abort(self, req: SimRequest) -> None:
        now = self._loop.time()
        self._sync(now)
        self.engine.abort(req, now)
        self._kick()

    def _publish(self, events: list[Any]) -> None:
        if self.publisher is not None:
            self.publisher.publish(events)

    def _gauges(self) -> Gauges:
        e = self.engine
        running = sorted({r.lora_name for r in e.running if r.lora_name}) if self.loras else []
        waiting = sorted({r.lora_name for r in e.waiting if r.lora_name}) if self.loras else []
        return Gauges(
            running=len(e.running),
            waiting_capacity=len(e.waiting),
            waiting_deferred=len(e.loading) + len(e.loaded),
            kv_fetch_waiting=0,
            kv_fetch_in_progress=len(e.loading),
            kv_usage=self.pool.usage(),
            running_loras=running,
            waiting_loras=waiting,
        )

    # ---- P/D ------------------------------------------------------------------------
    def _lease_view(self, lease_id: str) -> LeaseView | None:
        lease = self.engine.leases.get(lease_id)
        if lease is None:
            return None
        keys = block_keys(lease.prompt_ids, lease.block_hashes, self.cfg.block_size, self.hash_fn)
        return LeaseView(block_ids=lease.block_ids, keys=keys)

    def _start_load(self, req: SimRequest) -> None:
        task = asyncio.get_running_loop().create_task(self._load(req))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _load(self, req: SimRequest) -> None:
        loop = asyncio.get_running_loop()
        src = req.remote_source
        assert src is not None
        nixl = self.stats.nixl
        t0 = loop.time()
        keys = block_keys(req.prompt_ids, req.block_hashes, self.cfg.block_size, self.hash_fn)
        error: str | None = None
        timings: dict[str, float] = {}
        try:
            nbytes = await pull_blocks(
                nixl=self.nixl,
                local_block_ids=req.block_ids,
                timings=timings,
                host=src.host,
                port=src.port,
                engine_id=src.engine_id,
                request_id=src.request_id,
                block_ids=src.block_ids,
                expected_keys=keys,
                deadline_s=self.cfg.transfer_timeout,
            )
            remaining = self.latency.transfer(req.num_prompt_tokens) - (loop.time() - t0)
            if remaining > 0:
                await asyncio.sleep(remaining)
            nixl.xfer_time.observe(loop.time() - t0)
            nixl.post_time.observe(timings.get("post", 0.0))
            if "nixl" in timings:
                self.nixl_reads += 1
            nixl.bytes_transferred.observe(nbytes)
            nixl.num_descriptors.observe(len(keys))
        except TransferError as e:
            nixl.failed_transfers += 1
            error = str(e)
        self._sync(loop.time())
        self.engine.load_finished(req, error, loop.time())
        self._kick()

    def _remote_source(self, ktp: dict[str, Any]) -> RemoteSource:
        try:
            ids = ktp["remote_block_ids"]
            block_ids = ids[0] if ids and isinstance(ids[0], list) else ids
            return RemoteSource(
                engine_id=str(ktp["remote_engine_id"]),
                request_id=str(ktp["remote_request_id"]),
                host=str(ktp["remote_host"]),
                port=int(ktp["remote_port"]),
                block_ids=[int(b) for b in block_ids],
                num_tokens=int(ktp.get("remote_num_tokens") or 0),
            )
        except (KeyError, TypeError, ValueError, IndexError):
            raise api.ApiError(
                400,
                "kv_transfer_params with do_remote_prefill need remote_engine_id, "
                "remote_request_id, remote_host, remote_port and remote_block_ids",
                "kv_transfer_params",
            ) from None

    def _prefill_params(self, req: SimRequest) -> dict[str, Any]:
        bs = self.cfg.block_size
        nblocks = -(-req.num_prompt_tokens // bs)
        assert self.side is not None
        return {
            "do_remote_prefill": True,
            "do_remote_decode": False,
            "remote_block_ids": [req.block_ids[:nblocks]],
            "remote_engine_id": self.engine_id,
            "remote_request_id": req.request_id,
            "remote_host": self.advertise_host,
            "remote_port": self.side.port,
            "tp_size": 1,
            "dcp_size": 1,
            "pp_size": 1,
            "remote_num_tokens": req.num_prompt_tokens,
            "remote_blocks_expiry_time": None,
            "transfer_mode": "pull",
            "remote_prefill_cached_tokens": req.num_cached_tokens,
        }

    # ---- HTTP -----------------------------------------------------------------------
    def _maybe_fail(self) -> None:
        cfg = self.cfg
        if cfg.failure_rate <= 0.0 or self._rng.random() >= cfg.failure_rate:
            return
        kind = self._rng.choice(cfg.failure_types)
        if kind == "rate_limit":
            raise api.ApiError(429, f"Rate limit reached for {cfg.model}")
        if kind == "server_error":
            raise api.ApiError(500, "Internal server error")
        if kind == "invalid_api_key":
            raise api.ApiError(401, "Incorrect API key provided.")
        if kind == "context_length":
            raise api.ApiError(
                400,
                f"This model's maximum context length is {cfg.max_model_len} tokens. However, "
                "your request has too many input tokens. Please reduce the length of the input messages.",
                "input_tokens",
            )
        if kind == "invalid_request":
            raise api.ApiError(400, "Invalid request parameters")
        raise api.ApiError(404, "The model `unknown-model` does not exist.", "model")

    @staticmethod
    def _body(request: Request) -> Any:
        try:
            return orjson.loads(request.body)
        except orjson.JSONDecodeError as e:
            raise api.ApiError(
                400,
                "1 validation error:\n  {'type': 'json_invalid', 'loc': 'body', "
                f"'msg': 'JSON decode error', 'ctx': {{'error': {str(e)!r}}}}}",
                "body",
                "Bad Request",
            ) from None

    async def _completions(self, request: Request) -> Response | Stream:
        return await self._generate(request, "completion")

    async def _chat(self, request: Request) -> Response | Stream:
        return await self._generate(request, "chat")

    async def _responses(self, request: Request) -> Response | Stream:
        return await self._generate(request, "responses")

    async def _generate(self, request: Request, kind: str) -> Response | Stream:
        try:
            body = self._body(request)
            self._maybe_fail()
            p = api.parse(
                kind,
                body,
                tok=self.tok,
                base_model=self.cfg.model,
                loras=set(self.loras),
                max_model_len=self.cfg.max_model_len,
            )
            if kind == "responses" and p.stream:
                raise api.ApiError(
                    400, "streaming /v1/responses is not supported by the simulator", "stream"
                )
            req = self._make_request(p, kind)
            if p.stream:
                return await self._stream(request, p, req)
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()

            def done(r: SimRequest) -> None:
                if r.finished and not fut.done():
                    fut.set_result(None)

            req.listener = done
            req.notify_tokens = False
            self._submit(req)
            try:
                await fut
            except asyncio.CancelledError:
                self._abort(req)
                raise
            if req.error is not None:
                raise api.ApiError(500, req.error)
            return _json(self._final_body(p, req))
        except api.ApiError as e:
            return _json(e.body(), e.status)
        except (asyncio.CancelledError, ConnectionError):
            raise
        except Exception:  # a bug must answer like vLLM does, not with a traceback page
            log.exception("request failed")
            return _json(api.error_body(500, "Internal server error"), 500)

    def _make_request(self, p: api.Parsed, kind: str) -> SimRequest:
        ktp = p.kv_transfer_params
        remote_decode = bool(ktp and ktp.get("do_remote_decode")) and self.serves_kv
        source = None
        if ktp and ktp.get("do_remote_prefill") and self.pulls_kv:
            source = self._remote_source(ktp)
        prefix = {"completion": "cmpl", "chat": "chatcmpl", "responses": "resp"}[kind]
        lora_id = self.loras.get(p.lora) if p.lora else None
        hashes = chain_block_hashes(
            p.prompt_ids,
            self.cfg.block_size,
            self.hash_fn,
            extra_keys=(p.lora,) if p.lora else None,
            parent=self.engine.root_hash(),  # = none_hash(hash_fn, hash_seed), cached
        )
        return SimRequest(
            request_id=f"{prefix}-{self._ids.getrandbits(64):016x}",
            prompt_ids=p.prompt_ids,
            block_hashes=hashes,
            max_tokens=p.max_tokens,
            stop_after=p.stop_after,
            lora_name=p.lora,
            lora_id=lora_id,
            params_n=p.n,
            remote_decode=remote_decode,
            remote_source=source,
            seed=p.seed,
        )

    def _usage(self, req: SimRequest, chat: bool) -> dict[str, Any]:
        return api.make_usage(
            req.num_prompt_tokens,
            len(req.output_ids),
            req.num_cached_tokens + req.num_external_tokens,
            chat=chat,
        )

    def _final_body(self, p: api.Parsed, req: SimRequest) -> dict[str, Any]:
        text = "".join(self.tok.token_str(t) for t in req.output_ids)
        ktp = self._prefill_params(req) if req.lease_id is not None else None
        if p.kind == "completion":
            return api.completion_body(
                req.request_id,
                p.model,
                text,
                finish=req.finish_reason,
                usage=self._usage(req, p.kind == "chat"),
                kv_transfer_params=ktp,
                fingerprint=self.fingerprint,
            )
        if p.kind == "chat":
            return api.chat_body(
                req.request_id,
                p.model,
                text,
                finish=req.finish_reason,
                usage=self._usage(req, p.kind == "chat"),
                kv_transfer_params=ktp,
                fingerprint=self.fingerprint,
            )
        return api.responses_body(
            req.request_id,
            p.model,
            text,
            finish=req.finish_reason,
            prompt=req.num_prompt_tokens,
            completion=len(req.output_ids),
            cached=req.num_cached_tokens + req.num_external_tokens,
        )

    async def _stream(self, request: Request, p: api.Parsed, req: SimRequest) -> Response | Stream:
        ready = asyncio.Event()

        def notify(_r: SimRequest) -> None:
            ready.set()

        req.listener = notify
        self._submit(req)
        created = int(time.time())
        resp: Stream | None = None
        sent = 0
        chat = p.kind == "chat"
        obj = "chat.completion.chunk" if chat else "text_completion"
        # A token chunk that is not the last one differs from the next only by its text:
        # SSE bytes before and after the JSON string, cut from the dict the API builds.
        tpl: tuple[bytes, bytes] | None = None
        if not p.continuous_usage:
            make = api.chat_chunk if chat else api.completion_chunk
            head, _, tail = _sse(make(req.request_id, created, p.model, _MARK, None)).partition(
                _MARK_JSON
            )
            tpl = (head, tail)
        first = b""  # chat's role chunk, sent with the first token (one write)
        try:
            while True:
                await ready.wait()
                ready.clear()
                if req.error is not None and resp is None:
                    raise api.ApiError(500, req.error)
                if resp is None:
                    resp = request.stream(headers=_SSE_HEADERS)
                    if chat:
                        role = api.chat_role_chunk(req.request_id, created, p.model)
                        if p.continuous_usage:
                            role["usage"] = api.stream_usage(req.num_prompt_tokens, 0, 0, chat=True)
                        first = _sse(role)
                new = req.output_ids[sent:]
                chunks: list[dict[str, Any] | bytes] = []
                for i, tid in enumerate(new):
                    last = req.finished and i == len(new) - 1
                    finish = req.finish_reason if last else None
                    text = self.tok.token_str(tid)
                    if tpl is not None and not last:  # the common chunk, from its template
                        chunks.append(tpl[0] + orjson.dumps(text) + tpl[1])
                        continue
                    chunk = (
                        api.chat_chunk(req.request_id, created, p.model, text, finish)
                        if chat
                        else api.completion_chunk(req.request_id, created, p.model, text, finish)
                    )
                    if last and req.lease_id is not None:
                        chunk["kv_transfer_params"] = self._prefill_params(req)
                    if p.continuous_usage:
                        chunk["usage"] = api.stream_usage(
                            req.num_prompt_tokens, sent + i + 1, 0, chat=chat
                        )
                    chunks.append(chunk)
                sent += len(new)
                if req.finished:
                    if req.error is not None:
                        chunks.append(api.error_body(500, req.error))
                    elif p.include_usage:
                        cached = req.num_cached_tokens + req.num_external_tokens
                        u = api.stream_usage(req.num_prompt_tokens, sent, cached, chat=chat)
                        chunks.append(api.usage_chunk(req.request_id, created, p.model, obj, u))
                    if chunks and isinstance(chunks[-1], dict) and "error" not in chunks[-1]:
                        # vLLM puts the fingerprint on the last chunk before [DONE].
                        chunks[-1]["system_fingerprint"] = self.fingerprint
                out = first + b"".join(c if type(c) is bytes else _sse(c) for c in chunks)
                first = b""
                if req.finished:
                    out += _DONE
                if req.finished:
                    resp.end(out)
                    return resp
                if out:
                    await resp.write(out)
        except api.ApiError as e:
            return _json(e.body(), e.status)
        except (asyncio.CancelledError, ConnectionError):
            if not req.finished:
                self._abort(req)
            raise
        except Exception:
            if not req.finished:
                self._abort(req)
            if resp is None:
                raise  # _generate answers with a JSON 500
            log.exception("stream failed")
            resp.end(first + _sse(api.error_body(500, "Internal server error")) + _DONE)
            return resp

    async def _tokenize(self, request: Request) -> Response:
        try:
            body = self._body(request)
            if not isinstance(body, dict):
                raise api.ApiError(400, "request body must be a JSON object")
            api.resolve_model(body, self.cfg.model, set(self.loras))
            if "messages" in body:
                ids = api._chat_ids(body, self.tok)
            else:
                prompt = body.get("prompt")
                if not isinstance(prompt, str):
                    raise api.ApiError(400, "prompt must be a string", "prompt")
                ids = self.tok.encode(prompt, body.get("add_special_tokens", True) is not False)
            strs = [self.tok.token_str(t) for t in ids] if body.get("return_token_strs") else None
            return _json(
                {
                    "count": len(ids),
                    "max_model_len": self.cfg.max_model_len,
                    "tokens": ids,
                    "token_strs": strs,
                }
            )
        except api.ApiError as e:
            return _json(e.body(), e.status)

    async def _cached_prefix(self, request: Request) -> Response:
        """``{"prompt": str}`` -> ``{"prompt_tokens", "cached_blocks", "cached_tokens",
        "waiting", "running", "kv_cache_usage"}``; read-only (no LRU touch, no events)."""
        try:
            body = self._body(request)
            prompt = body.get("prompt") if isinstance(body, dict) else None
            if not isinstance(prompt, str):
                raise api.ApiError(400, "prompt must be a string", "prompt")
            ids = self.tok.encode(prompt, True)
            hashes = chain_block_hashes(
                ids, self.cfg.block_size, self.hash_fn, parent=self.engine.root_hash()
            )
            self._sync()
            n = len(self.pool.lookup(hashes))
            return _json(
                {
                    "prompt_tokens": len(ids),
                    "cached_blocks": n,
                    "cached_tokens": n * self.cfg.block_size,
                    "waiting": len(self.engine.waiting),
                    "running": len(self.engine.running),
                    "kv_cache_usage": self.pool.usage(),
                }
            )
        except api.ApiError as e:
            return _json(e.body(), e.status)

    async def _detokenize(self, request: Request) -> Response:
        try:
            body = self._body(request)
            tokens = body.get("tokens") if isinstance(body, dict) else None
            if not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
                raise api.ApiError(400, "tokens must be a list of integers", "tokens")
            return _json({"prompt": self.tok.decode(tokens)})
        except api.ApiError as e:
            return _json(e.body(), e.status)

    async def _models(self, request: Request) -> Response:
        def card(mid: str, root: str, parent: str | None) -> dict[str, Any]:
            return {
                "id": mid,
                "object": "model",
                "created": self._created,
                "owned_by": "vllm",
                "root": root,
                "parent": parent,
                "max_model_len": self.cfg.max_model_len,
                "permission": [
                    {
                        "id": f"modelperm-{self.engine_id.replace('-', '')[:16]}",
                        "object": "model_permission",
                        "created": self._created,
                        "allow_create_engine": False,
                        "allow_sampling": True,
                        "allow_logprobs": True,
                        "allow_search_indices": False,
                        "allow_view": True,
                        "allow_fine_tuning": False,
                        "organization": "*",
                        "group": None,
                        "is_blocking": False,
                    }
                ],
            }

        data = [card(self.cfg.model, self.cfg.model, None)]
        data += [card(n, self.lora_paths[n], self.cfg.model) for n in self.loras]
        return _json({"object": "list", "data": data})

    async def _load_lora(self, request: Request) -> Response:
        """vLLM's runtime LoRA loading (``VLLM_ALLOW_RUNTIME_LORA_UPDATING``)."""
        try:
            body = self._body(request)
            name = body.get("lora_name") if isinstance(body, dict) else None
            path = body.get("lora_path") if isinstance(body, dict) else None
            if not self.cfg.lora_enabled:
                raise api.ApiError(400, "LoRA is not enabled (start with --enable-lora)")
            if not isinstance(name, str) or not name or not isinstance(path, str) or not path:
                raise api.ApiError(400, "Both 'lora_name' and 'lora_path' must be provided.")
            if name in self.loras:
                raise api.ApiError(400, f"The lora adapter '{name}' has already been loaded.")
            self.loras[name] = self._next_lora_id
            self.lora_paths[name] = path
            self._next_lora_id += 1
            return Response(
                f"Success: LoRA adapter '{name}' added successfully.".encode(), 200, _TEXT
            )
        except api.ApiError as e:
            return _json(e.body(), e.status)

    async def _unload_lora(self, request: Request) -> Response:
        try:
            body = self._body(request)
            name = body.get("lora_name") if isinstance(body, dict) else None
            if not isinstance(name, str) or name not in self.loras:
                raise api.ApiError(404, f"The lora adapter '{name}' cannot be found.")
            del self.loras[name]
            del self.lora_paths[name]
            return Response(
                f"Success: LoRA adapter '{name}' removed successfully.".encode(), 200, _TEXT
            )
        except api.ApiError as e:
            return _json(e.body(), e.status)

    async def _health(self, request: Request) -> Response:
        return Response(b"", 200, None)

    async def _version(self, request: Request) -> Response:
        return _json({"version": VLLM_VERSION})

    async def _metrics(self, request: Request) -> Response:
        """As vLLM: ``/metrics/?name[]=`` filters, ``/metrics`` does not."""
        self._sync()
        text = _METRICS_FILTER.serve(self.metrics.render(), request.path, request.query)
        return Response(text.encode(), 200, b"text/plain; version=0.0.4; charset=utf-8")
