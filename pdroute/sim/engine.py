"""The simulated engine core: a vLLM-style continuous-batching scheduler.

Pure and synchronous: the caller passes ``now`` (seconds, any monotonic clock) and
drives the loop (:mod:`pdroute.sim.server` sleeps for the returned step duration;
tests advance a virtual clock). One *step* = admit waiting requests (FCFS, up to
``max_num_seqs`` running, while KV blocks last), then one forward pass that
prefills the newly admitted requests and decodes one token for every other
running request. The step lasts what :class:`~pdroute.sim.latency.LatencyModel`
says; :meth:`Engine.complete_step` then emits the tokens.

Invariants:

- a request is in exactly one of ``waiting`` (deque), ``loading`` (set: pulling KV
  from a prefill server), ``loaded`` (deque: KV arrived, waiting for a slot),
  ``running`` (list), or finished;
- ``len(running) <= max_num_seqs``; ``len(waiting) <= max_waiting``;
- a running request holds references to at least ``ceil(len / block_size)`` blocks,
  ``len`` = prompt + generated tokens + the token computed in the current step
  (blocks are allocated step by step as in vLLM; when none is free the most recently
  admitted running request is *preempted*: its blocks are freed and it goes back to
  the head of the waiting queue, to be recomputed later);
- a loading request holds the blocks of its prompt plus one token;
- a finished request with ``do_remote_decode`` keeps its blocks referenced as a
  *lease* until the decode server pulled them or the lease expired.

Blocks are prefix-cached as soon as their tokens' KV is computed: prompt blocks after
the prefill, generated blocks during decode (each with a ``BlockStored`` event).

Simplifications vs vLLM (documented, deliberate): no chunked prefill; a request must
fit the whole cache on its own (checked at admission, so progress is guaranteed).
"""

from __future__ import annotations

import enum
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pdroute.protocol.blockhash import HashFn, hash_block, none_hash, sha256_pickle
from pdroute.sim.kvcache import BlockPool
from pdroute.sim.latency import LatencyModel
from pdroute.sim.metrics import EngineStats, Histogram
from pdroute.sim.tokenizer import Tokenizer


class QueueFull(Exception):
    """The waiting queue is at ``max_waiting``."""


class ReqState(enum.Enum):
    WAITING = "waiting"
    LOADING = "loading"
    LOADED = "loaded"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(frozen=True, slots=True)
class RemoteSource:
    """Where a decode request pulls its KV from (NixlConnector's kv_transfer_params)."""

    engine_id: str
    request_id: str
    host: str
    port: int
    block_ids: list[int]
    num_tokens: int


@dataclass(eq=False, slots=True)
class SimRequest:
    request_id: str
    prompt_ids: list[int]
    block_hashes: list[bytes]
    max_tokens: int
    #: Stop (finish_reason "stop") after this many tokens when below max_tokens.
    stop_after: int | None = None
    lora_name: str | None = None
    lora_id: int | None = None
    params_n: int = 1
    remote_decode: bool = False
    remote_source: RemoteSource | None = None
    seed: int = 0
    #: Called (synchronously) whenever tokens were appended or the request finished.
    listener: Callable[[SimRequest], None] | None = None
    #: False: ``listener`` is only called when the request finished (non-streaming).
    notify_tokens: bool = True
    state: ReqState = ReqState.WAITING
    output_ids: list[int] = field(default_factory=list)
    block_ids: list[int] = field(default_factory=list)
    num_cached_tokens: int = 0
    num_external_tokens: int = 0
    finish_reason: str | None = None
    error: str | None = None
    lease_id: str | None = None
    num_preemptions: int = 0
    #: Full blocks (prompt, then generated) whose hashes are in ``block_hashes``.
    generated_hashes: list[bytes] = field(default_factory=list)
    t_arrival: float = 0.0
    t_scheduled: float = 0.0
    t_first_token: float = 0.0
    t_last_token: float = 0.0
    t_finished: float = 0.0
    #: ``len(prompt_ids)`` (the prompt never changes).
    num_prompt_tokens: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self.num_prompt_tokens = len(self.prompt_ids)

    @property
    def finished(self) -> bool:
        return self.state is ReqState.FINISHED


@dataclass(slots=True)
class Lease:
    """Blocks a prefill server holds for a decode server to pull."""

    lease_id: str
    block_ids: list[int]
    block_hashes: list[bytes]
    prompt_ids: list[int]
    expiry: float


class Engine:
    def __init__(
        self,
        *,
        pool: BlockPool,
        latency: LatencyModel,
        stats: EngineStats,
        max_num_seqs: int = 256,
        max_waiting: int = 10_000,
        lease_seconds: float = 480.0,
        max_loras: int = 0,
        on_load: Callable[[SimRequest], None] | None = None,
        on_events: Callable[[list[Any]], None] | None = None,
        tokenizer: Tokenizer | None = None,
        hash_fn: HashFn = sha256_pickle,
        hash_seed: str | None = None,
    ) -> None:
        self.tokenizer = tokenizer or Tokenizer()
        self.hash_fn = hash_fn
        self.hash_seed = hash_seed
        self.pool = pool
        self.latency = latency
        self.stats = stats
        self.max_num_seqs = max_num_seqs
        self.max_waiting = max_waiting
        self.lease_seconds = lease_seconds
        #: Distinct LoRA adapters allowed in one batch (vLLM ``--max-loras``); 0 = no limit.
        self.max_loras = max_loras
        self.on_load = on_load
        self.on_events = on_events
        self.waiting: deque[SimRequest] = deque()
        self.loading: set[SimRequest] = set()
        self.loaded: deque[SimRequest] = deque()
        self.running: list[SimRequest] = []
        self.leases: OrderedDict[str, Lease] = OrderedDict()
        self._prefilling: list[SimRequest] = []
        self._step_start = 0.0
        self._root_hash: bytes | None = None
        #: Fold the histograms' pending observations when generation_tokens reaches this.
        self._fold_at = 0.0

    # ---- admission ------------------------------------------------------------------
    def blocks_needed(self, req: SimRequest) -> int:
        """Blocks for the request's whole sequence (prompt + max_tokens)."""
        bs = self.pool.block_size
        return -(-(req.num_prompt_tokens + req.max_tokens) // bs)

    def _blocks_for_step(self, req: SimRequest) -> int:
        """Blocks the next step needs: every token so far plus the one computed now."""
        bs = self.pool.block_size
        return -(-(req.num_prompt_tokens + len(req.output_ids) + 1) // bs)

    def _preempt(self, req: SimRequest) -> None:
        """Free a running request's KV; it restarts (recompute) from the waiting head."""
        self.running.remove(req)
        self.pool.free(req.block_ids)
        req.block_ids = []
        req.generated_hashes = []  # recomputed (and re-cached) after the recompute
        req.state = ReqState.WAITING
        req.num_preemptions += 1
        self.stats.preemptions += 1
        self.waiting.appendleft(req)

    def _grow_running(self) -> None:
        """Give each running request the blocks this step writes, preempting if needed."""
        pool = self.pool
        bs = pool.block_size
        running = self.running
        i = 0
        while i < len(running):
            req = running[i]
            # = self._blocks_for_step(req) - len(req.block_ids), inlined (hot loop)
            need = -(-(req.num_prompt_tokens + len(req.output_ids) + 1) // bs) - len(req.block_ids)
            while need > 0:
                got = pool.allocate([], need)
                if got is not None:
                    req.block_ids.extend(got)
                    break
                victim = running[-1]
                self._preempt(victim)  # vLLM preempts the last-scheduled request
                if victim is req:
                    break
            i += 1

    def add(self, req: SimRequest, now: float) -> None:
        """Queue a request. Raises :class:`QueueFull` or ``ValueError`` (can never fit)."""
        if self.blocks_needed(req) > self.pool.num_blocks:
            raise ValueError(
                f"request needs {self.blocks_needed(req)} KV blocks but the cache has "
                f"{self.pool.num_blocks}"
            )
        if len(self.waiting) >= self.max_waiting:
            self.stats.admission_rejections += 1
            raise QueueFull(req.request_id)
        req.t_arrival = now
        req.state = ReqState.WAITING
        self.waiting.append(req)

    def abort(self, req: SimRequest, now: float) -> None:
        """Client went away: drop the request wherever it is."""
        if req.state is ReqState.WAITING:
            self.waiting.remove(req)
        elif req.state is ReqState.LOADED:
            self.loaded.remove(req)
            self.pool.free(req.block_ids)
        elif req.state is ReqState.LOADING:
            self.loading.discard(req)
            self.pool.free(req.block_ids)
        elif req.state is ReqState.RUNNING:
            self.running.remove(req)
            if req in self._prefilling:
                self._prefilling.remove(req)
            self.pool.free(req.block_ids)
        else:
            return
        req.block_ids = []
        self._finish(req, "abort", now, free=False)

    @property
    def has_work(self) -> bool:
        return bool(self.running or self.waiting or self.loaded)

    def next_deadline(self) -> float | None:
        """When the next lease expires (the loop must wake then even if idle)."""
        if not self.leases:
            return None
        return next(iter(self.leases.values())).expiry

    # ---- stepping -------------------------------------------------------------------
    def schedule(self, now: float) -> float | None:
        """Admit requests and plan one step; returns its duration or None when idle."""
        if self.leases:
            self.expire_leases(now)
        if self.running:
            self._grow_running()
        admitted = self._admit(now) if self.loaded or self.waiting else []
        if self.pool.pending_events:
            self._flush_events()
        if not self.running:
            self._prefilling = []
            return None
        self._prefilling = admitted
        self._step_start = now
        if not admitted:  # decode-only step: = latency.step(len(running), [])
            return self.latency.itl(len(self.running))
        prefill = [self._prefill_tokens(r) for r in admitted]
        decoding = len(self.running) - len(admitted)
        return self.latency.step(decoding, prefill)

    def _admit(self, now: float) -> list[SimRequest]:
        """Move loaded, then waiting requests (FCFS) to running; returns the admitted ones."""
        stats = self.stats
        bs = self.pool.block_size
        admitted: list[SimRequest] = []
        while self.loaded and len(self.running) < self.max_num_seqs:
            req = self.loaded.popleft()
            req.state = ReqState.RUNNING
            self.running.append(req)
            admitted.append(req)
        active_loras = (
            {r.lora_name for r in self.running if r.lora_name} if self.max_loras else set()
        )
        while self.waiting and len(self.running) < self.max_num_seqs:
            req = self.waiting[0]
            if (
                self.max_loras
                and req.lora_name
                and req.lora_name not in active_loras
                and len(active_loras) >= self.max_loras
            ):
                break  # the adapter budget is full: wait for a running adapter to drain
            # vLLM never counts the last prompt token as a hit (it must be computed).
            hittable = (req.num_prompt_tokens - 1) // bs
            hits = self.pool.lookup(req.block_hashes[:hittable])
            ids = self.pool.allocate(hits, self._blocks_for_step(req) - len(hits))
            if ids is None:
                break  # FCFS: the head waits for blocks, like vLLM
            self.waiting.popleft()
            req.block_ids = ids
            resumed = bool(req.output_ids)
            req.num_cached_tokens = len(hits) * bs
            if not resumed:
                req.t_scheduled = now
                stats.prefix_cache_queries += req.num_prompt_tokens
                stats.prefix_cache_hits += req.num_cached_tokens
                stats.cached_by_source["device"] += req.num_cached_tokens
            if req.remote_source is not None and not resumed:
                req.state = ReqState.LOADING
                self.loading.add(req)
                stats.external_prefix_cache_queries += req.num_prompt_tokens
                if self.on_load is not None:
                    self.on_load(req)
                continue
            req.state = ReqState.RUNNING
            self.running.append(req)
            admitted.append(req)
            if req.lora_name:
                active_loras.add(req.lora_name)
        return admitted

    def _cache_generated(self, req: SimRequest) -> None:
        """Prefix-cache blocks filled by generated tokens (vLLM caches them too).

        A block counts once its tokens' KV is computed: every token but the newest.
        """
        bs = self.pool.block_size
        computed = req.num_prompt_tokens + len(req.output_ids) - 1
        n_prompt = len(req.block_hashes)
        while n_prompt + len(req.generated_hashes) < computed // bs:
            i = n_prompt + len(req.generated_hashes)
            if i >= len(req.block_ids):
                return
            chain = req.generated_hashes or req.block_hashes
            parent = chain[-1] if chain else None
            start = i * bs
            plen = req.num_prompt_tokens
            if start >= plen:
                tokens = req.output_ids[start - plen : start - plen + bs]
            else:
                tokens = req.prompt_ids[start:plen] + req.output_ids[: start + bs - plen]
            extra = (req.lora_name,) if req.lora_name else None
            h = hash_block(
                self.hash_fn,
                parent if parent is not None else self.root_hash(),
                tokens,
                extra,
            )
            req.generated_hashes.append(h)
            self.pool.commit(
                [req.block_ids[i]],
                [h],
                tokens,
                parent,
                lora_id=req.lora_id,
                lora_name=req.lora_name,
                extra_keys=extra,
            )

    def root_hash(self) -> bytes:
        """vLLM's NONE_HASH for this engine's hash function and seed (computed once)."""
        root = self._root_hash
        if root is None:
            root = self._root_hash = none_hash(self.hash_fn, self.hash_seed)
        return root

    @staticmethod
    def _prefill_tokens(r: SimRequest) -> int:
        """Tokens a newly admitted request computes (a preempted one recomputes all)."""
        if r.output_ids:
            return r.num_prompt_tokens + len(r.output_ids) - r.num_cached_tokens
        return r.num_prompt_tokens - r.num_cached_tokens - r.num_external_tokens

    def complete_step(self, now: float) -> None:
        """Emit one token per running request (the first for newly prefilled ones)."""
        stats = self.stats
        prefilling = set(self._prefilling) if self._prefilling else ()
        self._prefilling = []
        pool = self.pool
        bs = pool.block_size
        output_token = self.tokenizer.output_token
        observe_itl = stats.h_itl.observe
        finished: list[SimRequest] = []
        step_tokens = 0
        running = self.running
        for req in running:
            out = req.output_ids
            pos = len(out)
            if not prefilling or req not in prefilling:
                observe_itl(now - req.t_last_token)
                step_tokens += 1
            elif out:  # resumed after preemption
                step_tokens += self._prefill_tokens(req)
                pool.commit(
                    req.block_ids[: len(req.block_hashes)],
                    req.block_hashes,
                    req.prompt_ids,
                    None,
                    lora_id=req.lora_id,
                    lora_name=req.lora_name,
                    extra_keys=(req.lora_name,) if req.lora_name else None,
                )
            else:
                computed = req.num_prompt_tokens - req.num_cached_tokens - req.num_external_tokens
                step_tokens += computed
                stats.prompt_tokens += req.num_prompt_tokens
                stats.prompt_by_source["local_compute"] += computed
                stats.prompt_by_source["local_cache_hit"] += req.num_cached_tokens
                stats.prompt_by_source["external_kv_transfer"] += req.num_external_tokens
                stats.h_prompt_tokens.observe(req.num_prompt_tokens)
                stats.h_prefill_computed.observe(computed)
                stats.h_params_n.observe(req.params_n)
                stats.h_params_max_tokens.observe(req.max_tokens)
                stats.h_max_generation_tokens.observe(req.max_tokens)
                stats.h_ttft.observe(now - req.t_arrival)
                stats.h_queue.observe(max(0.0, req.t_scheduled - req.t_arrival))
                stats.h_prefill.observe(now - req.t_scheduled)
                req.t_first_token = now
                nfull = len(req.block_hashes)
                pool.commit(
                    req.block_ids[:nfull],
                    req.block_hashes,
                    req.prompt_ids,
                    None,
                    lora_id=req.lora_id,
                    lora_name=req.lora_name,
                    extra_keys=(req.lora_name,) if req.lora_name else None,
                )
            out.append(output_token(req.seed, pos))
            req.t_last_token = now
            # Blocks whose KV is now computed (all tokens but the newest): cache new full ones.
            if (req.num_prompt_tokens + pos) // bs > len(req.block_hashes) + len(
                req.generated_hashes
            ):
                self._cache_generated(req)
            n = pos + 1
            if n >= req.max_tokens:
                req.finish_reason = "length"
                finished.append(req)
            elif req.stop_after is not None and n >= req.stop_after:
                req.finish_reason = "stop"
                finished.append(req)
            elif req.notify_tokens and req.listener is not None:
                req.listener(req)
        stats.generation_tokens += len(running)
        if step_tokens:
            stats.h_iteration_tokens.observe(step_tokens)
        if finished:
            done = set(finished)
            self.running = [r for r in running if r not in done]
            for req in finished:
                self._finish(req, req.finish_reason or "length", now)
        if stats.generation_tokens >= self._fold_at:
            stats.fold()
            self._fold_at = stats.generation_tokens + Histogram.FOLD_AT
        self._flush_events()

    def load_finished(self, req: SimRequest, error: str | None, now: float) -> None:
        """The KV pull for ``req`` ended (``error`` None on success)."""
        if req not in self.loading:
            return
        self.loading.discard(req)
        if error is not None:
            self.pool.free(req.block_ids)
            req.block_ids = []
            req.error = error
            self._finish(req, "error", now, free=False)
            return
        req.num_external_tokens = req.num_prompt_tokens - req.num_cached_tokens
        self.stats.external_prefix_cache_hits += req.num_external_tokens
        self.stats.cached_by_source["p2p"] += req.num_external_tokens
        req.state = ReqState.LOADED
        self.loaded.append(req)

    def _finish(self, req: SimRequest, reason: str, now: float, *, free: bool = True) -> None:
        stats = self.stats
        req.state = ReqState.FINISHED
        req.finish_reason = reason
        req.t_finished = now
        stats.success[reason] = stats.success.get(reason, 0.0) + 1
        if req.output_ids:
            stats.h_generation_tokens.observe(len(req.output_ids))
            stats.h_e2e.observe(now - req.t_arrival)
            stats.h_inference.observe(now - req.t_scheduled)
            stats.h_decode.observe(now - req.t_first_token)
            stats.h_preemptions.observe(req.num_preemptions)
            if len(req.output_ids) > 1:
                stats.h_tpot.observe((now - req.t_first_token) / (len(req.output_ids) - 1))
        if free and req.block_ids:
            if req.remote_decode and reason in ("length", "stop"):
                lease_id = req.request_id
                self.leases[lease_id] = Lease(
                    lease_id=lease_id,
                    block_ids=req.block_ids,
                    block_hashes=req.block_hashes,
                    prompt_ids=req.prompt_ids,
                    expiry=now + self.lease_seconds,
                )
                req.lease_id = lease_id
            else:
                self.pool.free(req.block_ids)
        if req.listener is not None:
            req.listener(req)

    # ---- P/D leases -----------------------------------------------------------------
    def release_lease(self, lease_id: str) -> bool:
        lease = self.leases.pop(lease_id, None)
        if lease is None:
            self.stats.nixl.notifications_after_expiry += 1
            return False
        self.pool.free(lease.block_ids)
        return True

    def expire_leases(self, now: float) -> int:
        n = 0
        while self.leases:
            lease = next(iter(self.leases.values()))
            if lease.expiry > now:
                break
            self.leases.popitem(last=False)
            self.pool.free(lease.block_ids)
            self.stats.nixl.kv_expired_reqs += 1
            n += 1
        return n

    def _flush_events(self) -> None:
        if self.pool.pending_events:
            events = self.pool.drain_events()
            if self.on_events is not None:
                self.on_events(events)


def new_request_id(prefix: str = "cmpl") -> str:
    return f"{prefix}-{uuid.uuid4().hex}"
