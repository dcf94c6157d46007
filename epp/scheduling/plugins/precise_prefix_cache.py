"""precise-prefix-cache-producer (+ precise-prefix-cache-scorer): prefix-cache
affinity from the engines' own KV events.

Per request:

1. ``prepare_data`` (async): token ids of the prompt (already on the request, the
   body's token-id prompt, a local ``tokenizer.json``, or the engine's ``/tokenize``),
   then the block keys (:mod:`epp.datalayer.tokenizer`; long prompts are hashed in
   chunks that yield to the event loop, so it keeps serving).
2. ``produce``: :meth:`KVBlockIndex.match` -> :class:`PrefixMatchInfo` (longest
   consecutive prefix per endpoint), read by ``prefix-cache-scorer`` with
   ``prefixMatchInfoProducerName: <this plugin's name>`` and by the P/D deciders.
3. ``pre_request``: with ``speculativeIndexing`` the chosen endpoints are assumed
   to hold the blocks for ``speculativeTTL`` (default 2 s) until their events arrive.

In the background (:meth:`run`, or started lazily by the first request when the
EPP does not start plugin tasks) it keeps one ZMQ subscription per pool endpoint
(llm-d ``kvEventsConfig.discoverPods``; address ``tcp://<ip>:<socketPort>`` or the
endpoint label ``pdroute.io/kv-events-endpoint``) and/or binds a shared socket
(``kvEventsConfig.zmqEndpoint``) that engines connect to, sets each endpoint's
index capacity from its ``num_gpu_blocks`` and purges endpoints that leave.

Parameters follow llm-d (``tokenProcessorConfig``, ``indexerConfig``,
``kvEventsConfig``, ``speculativeIndexing``, ``speculativeTTL``) so its configs
load unchanged; unknown keys are config errors naming the key and the file.

=====================================================  =========  ==============================
parameter                                              default    meaning
=====================================================  =========  ==============================
tokenProcessorConfig.blockSize / blockSizeTokens        16         tokens per block (vLLM-CPU: 128)
tokenProcessorConfig.hashSeed                           ""         vLLM's PYTHONHASHSEED ("" = unset)
tokenProcessorConfig.hashAlgo (pdroute)                 sha256     sha256 | sha256_cbor | auto (from
                                                                   cache_config_info)
tokenProcessorConfig.blockSizeFromMetrics (pdroute)     false      block size from cache_config_info
tokenProcessorConfig.rekeyFromEventTokens (pdroute)     false      recompute keys from the events'
                                                                   token_ids with xxh3 (engine hash
                                                                   algo/seed need not be known)
indexerConfig.kvBlockIndexConfig.capacityPerEndpoint    131072     LRU bound per endpoint (pdroute)
indexerConfig.kvBlockIndexConfig.capacityFromMetrics    true       1.25 x num_gpu_blocks when known
indexerConfig.kvBlockIndexConfig.maxEndpoints           1024       slots (bounds memory)
indexerConfig.kvBlockIndexConfig.inMemoryConfig         -          llm-d's size/podCacheSize: accepted
indexerConfig.tokenizersPoolConfig                      -          rejected (as in llm-d)
kvEventsConfig.zmqEndpoint                              ""         bind a shared SUB (engines connect)
kvEventsConfig.discoverPods                             true       one SUB per pool endpoint
kvEventsConfig.podDiscoveryConfig.socketPort            5557       engine PUB port (connect mode)
kvEventsConfig.podDiscoveryConfig.replaySocketPort      -1         engine replay ROUTER port (off)
kvEventsConfig.topicFilter                              "kv@"      ZMQ subscription prefix
kvEventsConfig.maxMessageBytes (pdroute)                16 MiB     larger messages are dropped
kvEventsConfig.receiveHighWaterMark (pdroute)           10000      ZMQ receive queue, messages
kvEventsConfig.engineType                               vllm       only vllm
speculativeIndexing                                     false      seed the chosen endpoints
speculativeTTL                                          2s         Go duration (ms, s, m)
tokenizer.source (pdroute)                              vllm       vllm (/tokenize of a pool member,
                                                                   or tokenizer.url) | local
                                                                   (tokenizer.modelDir) | none
=====================================================  =========  ==============================

Endpoint labels (pdroute): ``pdroute.io/kv-events-endpoint`` overrides the PUB
address of one endpoint, ``pdroute.io/kv-events-replay-endpoint`` its replay socket.
The topic's host field (``kv@<host>@<model>``) may be an ``ip:port`` endpoint key
or an ip that only one endpoint has.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections import deque
from collections.abc import Coroutine, Mapping, Sequence
from typing import Any, Self

import aiohttp
import zmq.asyncio

from epp.config import Params
from epp.datalayer.kvevents import (
    KVEventIngestor,
    KVEventSubscriber,
    SubscriberConfig,
    TopicResolver,
)
from epp.datalayer.tokenizer import (
    NO_EXTRAS,
    BlockKeyer,
    EngineKeyer,
    FastKeyer,
    LocalTokenizer,
    RequestExtras,
    RequestTokenizer,
    TokenizeCache,
    TokenizeError,
    VllmTokenizeClient,
    keys_cooperative,
)
from epp.datastore import Datastore, EndpointView
from epp.index.kvblock import KVBlockIndex
from epp.metrics import PLUGIN_DURATION, PREFIX_HIT_RATIO, PREFIX_INDEX_SIZE
from epp.scheduling.plugins._util import routed_endpoints, served_elsewhere
from epp.scheduling.plugins.prefix_cache_scorer import PrefixCacheScorer
from epp.scheduling.registry import BuildContext, register
from epp.scheduling.types import (
    CycleState,
    LLMRequest,
    PrefixMatchInfo,
    PrefixMatchProducer,
    PrepareData,
    PreRequest,
    ResponseComplete,
    SchedulingResult,
)

log = logging.getLogger(__name__)

EVENTS_ENDPOINT_LABEL = "pdroute.io/kv-events-endpoint"
REPLAY_ENDPOINT_LABEL = "pdroute.io/kv-events-replay-endpoint"
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m)?\s*$")


def parse_duration(text: str) -> float:
    """Go-style ``"2s"``, ``"500ms"``, ``"1m"`` (and bare seconds) -> seconds."""
    m = _DURATION.match(text)
    if m is None:
        raise ValueError(f"bad duration {text!r} (use e.g. 2s, 500ms)")
    v = float(m.group(1))
    return {"ms": v / 1000, "m": v * 60}.get(m.group(2) or "s", v)


class _Keys:
    """What prepare_data leaves for produce/pre_request."""

    __slots__ = ("block_size", "keys")

    def __init__(self, keys: list[int], block_size: int) -> None:
        self.keys = keys
        self.block_size = block_size


@register
class PrecisePrefixCacheProducer(PrefixMatchProducer, PrepareData, PreRequest, ResponseComplete):
    type_name = "precise-prefix-cache-producer"

    def __init__(
        self,
        name: str,
        *,
        index: KVBlockIndex,
        datastore: Datastore | None = None,
        block_size: int | None = 16,
        hash_algo: str | None = "sha256",
        hash_seed: str | None = None,
        rekey: bool = False,
        speculative: bool = False,
        tokenizer: RequestTokenizer | None = None,
        tokenizer_source: str = "vllm",
        zmq_endpoint: str | None = None,
        discover_pods: bool = True,
        socket_port: int = 5557,
        replay_port: int = -1,
        topic_filter: str = "kv@",
        max_message_bytes: int = 16 << 20,
        receive_hwm: int = 10_000,
        cooperative_threshold_blocks: int = 512,
        capacity_from_metrics: bool = True,
        reconcile_interval_s: float = 1.0,
    ) -> None:
        self.name = name
        self._hit_ratio = PREFIX_HIT_RATIO.labels(name)
        self.index = index
        self.datastore = datastore
        self.block_size = block_size
        self.hash_algo = hash_algo
        self.hash_seed = hash_seed
        self.rekey = rekey
        self.speculative = speculative
        self.tokenizer = tokenizer
        self.tokenizer_source = tokenizer_source
        self.zmq_endpoint = zmq_endpoint
        self.discover_pods = discover_pods
        self.socket_port = socket_port
        self.replay_port = replay_port
        self.cooperative_threshold_blocks = cooperative_threshold_blocks
        self.capacity_from_metrics = capacity_from_metrics
        self.reconcile_interval_s = reconcile_interval_s
        self.ingestor = KVEventIngestor(index, max_message_bytes=max_message_bytes)
        self._sub_config = SubscriberConfig(topic_filter=topic_filter, rcvhwm=receive_hwm)
        self._subscriber: KVEventSubscriber | None = None
        self._keyers: dict[tuple[int, str, str | None], BlockKeyer] = {}
        self._engine_tokenizers: dict[str, VllmTokenizeClient] = {}
        self._tokenize_cache = TokenizeCache()
        self._http: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None
        self.bound_address: str | None = None
        self._addr_to_key: dict[str, str | None] = {}
        self._background: set[asyncio.Task[None]] = set()
        #: Recent prepare-data durations (tokenize + keys), seconds; bounded.
        self.prepare_durations: deque[float] = deque(maxlen=4096)
        self._prepare_metric = PLUGIN_DURATION.labels("PrepareData", self.type_name, name)
        self._rekeyer = FastKeyer(block_size or 16, hash_seed)

    # ------------------------------------------------------------------ config

    @classmethod
    def from_params(cls, name: str, params: Params, ctx: BuildContext) -> Self:
        kwargs = cls.parse_params(params, ctx)
        params.finish()
        plugin = cls(name, datastore=ctx.datastore, **kwargs)
        ctx.on_endpoint_removed(plugin._endpoint_removed)
        return plugin

    @classmethod
    def parse_params(cls, params: Params, ctx: BuildContext) -> dict[str, Any]:
        tp = params.get_params("tokenProcessorConfig")
        block_size: int | None = 16
        hash_seed: str | None = None
        hash_algo: str | None = "sha256"
        rekey = False
        if tp is not None:
            legacy = tp.get_int("blockSize", 0, min_value=0, max_value=1 << 16)
            bst = tp.get_int("blockSizeTokens", 0, min_value=0, max_value=1 << 16)
            block_size = bst or legacy or 16
            if tp.get_bool("blockSizeFromMetrics", False):
                block_size = None
            hash_seed = tp.get_str("hashSeed", "") or None
            hash_algo = tp.get_str("hashAlgo", "sha256", choices=("sha256", "sha256_cbor", "auto"))
            if hash_algo == "auto":
                hash_algo = None
            rekey = tp.get_bool("rekeyFromEventTokens", False)
            tp.finish()
        ic = params.get_params("indexerConfig")
        capacity = 131_072
        max_endpoints = 1024
        capacity_from_metrics = True
        if ic is not None:
            if ic.get_any("tokenizersPoolConfig") is not None:
                raise ic.error(
                    "tokenizersPoolConfig", "not supported; use the tokenizer parameter instead"
                )
            kb = ic.get_params("kvBlockIndexConfig")
            if kb is not None:
                mem = kb.get_params("inMemoryConfig")
                if mem is not None:
                    # llm-d bounds keys globally; we bound entries per endpoint.
                    mem.get_int("size", 0, min_value=0)
                    mem.get_int("podCacheSize", 0, min_value=0, max_value=65535)
                    mem.finish()
                kb.get_bool("enableMetrics", False)
                capacity = kb.get_int(
                    "capacityPerEndpoint", capacity, min_value=1, max_value=1 << 28
                )
                max_endpoints = kb.get_int("maxEndpoints", max_endpoints, min_value=1)
                capacity_from_metrics = kb.get_bool("capacityFromMetrics", True)
                kb.finish()
            ic.get_list("kvCacheBackendConfigs")  # tier weights: every tier counts as a hit
            ic.get_params("prefixStoreConfig")
            ic.finish()
        ke = params.get_params("kvEventsConfig")
        zmq_endpoint = None
        discover = True
        socket_port = 5557
        replay_port = -1
        topic_filter = "kv@"
        max_bytes = 16 << 20
        hwm = 10_000
        if ke is not None:
            zmq_endpoint = ke.get_str("zmqEndpoint", "") or None
            topic_filter = ke.get_str("topicFilter", "kv@")
            ke.get_int("concurrency", 4, min_value=1)  # one event loop here; accepted
            ke.get_str("engineType", "vllm", choices=("vllm",))
            ke.get_bool("tracing", False)
            discover = ke.get_bool("discoverPods", True)
            max_bytes = ke.get_int("maxMessageBytes", max_bytes, min_value=1024)
            hwm = ke.get_int("receiveHighWaterMark", hwm, min_value=1, max_value=1_000_000)
            pd = ke.get_params("podDiscoveryConfig")
            if pd is not None:
                socket_port = pd.get_int("socketPort", 5557, min_value=1, max_value=65535)
                replay_port = pd.get_int("replaySocketPort", -1, max_value=65535)
                pd.get_str("podLabelSelector", "")
                pd.get_str("podNamespace", "")
                pd.finish()
            ke.finish()
        speculative = params.get_bool("speculativeIndexing", False)
        ttl_text = params.get_str("speculativeTTL", "2s")
        try:
            ttl = parse_duration(ttl_text)
        except ValueError as e:
            raise params.error("speculativeTTL", str(e)) from None
        tok = params.get_params("tokenizer")
        tokenizer: RequestTokenizer | None = None
        source = "vllm"
        if tok is not None:
            source = tok.get_str("source", "vllm", choices=("vllm", "local", "none"))
            url = tok.get_str("url", "")
            model_dir = tok.get_str("modelDir", "")
            tok.finish()
            if source == "local":
                if not model_dir:
                    raise tok.error("modelDir", "required with source: local")
                try:
                    tokenizer = LocalTokenizer(model_dir)
                except TokenizeError as e:
                    raise tok.error("modelDir", str(e)) from None
            elif source == "vllm" and url:
                tokenizer = VllmTokenizeClient(url)
        index = KVBlockIndex(
            capacity_per_endpoint=capacity,
            max_endpoints=max_endpoints,
            speculative_ttl_s=ttl,
            clock=ctx.clock or time.monotonic,
            rekey=FastKeyer(block_size or 16, hash_seed).chain if rekey else None,
        )
        if rekey and block_size is None:
            raise params.error("tokenProcessorConfig", "rekeyFromEventTokens needs a blockSize")
        return {
            "index": index,
            "block_size": block_size,
            "hash_algo": hash_algo,
            "hash_seed": hash_seed,
            "rekey": rekey,
            "speculative": speculative,
            "tokenizer": tokenizer,
            "tokenizer_source": source,
            "zmq_endpoint": zmq_endpoint,
            "discover_pods": discover,
            "socket_port": socket_port,
            "replay_port": replay_port,
            "topic_filter": topic_filter,
            "max_message_bytes": max_bytes,
            "receive_hwm": hwm,
            "capacity_from_metrics": capacity_from_metrics,
        }

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Start the background subscriber task (idempotent; needs a running loop)."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(
                self.run(), name=f"{self.name}-kvevents"
            )

    async def stop(self) -> None:
        t = self._task
        self._task = None
        if t is not None:
            t.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._engine_tokenizers.clear()
        if self._http is not None:
            await self._http.close()
            self._http = None

    async def run(self) -> None:
        """Keep the KV-event subscriptions in line with the pool until cancelled."""
        sub = KVEventSubscriber(
            self.ingestor, config=self._sub_config, context=zmq.asyncio.Context.instance()
        )
        self._subscriber = sub
        try:
            if self.zmq_endpoint:
                self.bound_address = sub.bind(
                    self.zmq_endpoint,
                    TopicResolver(lookup=self.resolve_host),
                    replay_address_for=self._replay_address,
                )
                log.info("%s: KV events socket bound at %s", self.name, self.bound_address)
            while True:
                self.reconcile()
                await asyncio.sleep(self.reconcile_interval_s)
        finally:
            self._subscriber = None
            await sub.close()

    def reconcile(self) -> None:
        """Subscribe to new endpoints, drop departed ones, size capacities."""
        ds = self.datastore
        if ds is None:
            return
        endpoints = ds.endpoints()
        self._addr_to_key = {}
        for e in endpoints:
            self._addr_to_key[e.key] = e.key
            # An address shared by several endpoints (ports) is ambiguous.
            self._addr_to_key[e.address] = None if e.address in self._addr_to_key else e.key
        sub = self._subscriber
        if sub is not None and self.discover_pods:
            want = {}
            for e in endpoints:
                addr = e.labels.get(EVENTS_ENDPOINT_LABEL) or _tcp(e.address, self.socket_port)
                want[e.key] = (
                    addr,
                    e.labels.get(REPLAY_ENDPOINT_LABEL) or self._replay_address(e.key),
                )
            for key in sub.connected():
                if key not in want:
                    self._spawn(sub.disconnect_endpoint(key))
            for key, (addr, replay) in want.items():
                if key not in sub.connected():
                    sub.connect_endpoint(key, addr, replay_address=replay)
        # Purge endpoints that left but were re-added by a late message.
        current = {e.key for e in endpoints}
        for key in self.index.endpoints():
            if key not in current:
                self.ingestor.forget(key)
        if self.capacity_from_metrics:
            for e in endpoints:
                m = ds.metrics(e.key)
                if m is not None and m.num_blocks:
                    cap = max(1024, int(m.num_blocks * 1.25))
                    if self.index.capacity(e.key) != cap and e.key in self.index.endpoints():
                        self.index.set_capacity(e.key, cap)
        PREFIX_INDEX_SIZE.labels(self.name).set(self.index.stats().entries)

    def resolve_host(self, host: str) -> str | None:
        """Topic host field -> endpoint key (exact ``ip:port`` or a unique ip)."""
        return self._addr_to_key.get(host)

    def _replay_address(self, endpoint: str) -> str | None:
        """The engine's replay ROUTER: endpoint label, else ``replaySocketPort``."""
        e = self.datastore.get(endpoint) if self.datastore is not None else None
        if e is None:
            return None
        label = e.labels.get(REPLAY_ENDPOINT_LABEL)
        if label:
            return label
        return _tcp(e.address, self.replay_port) if self.replay_port > 0 else None

    def _endpoint_removed(self, key: str) -> None:
        self.ingestor.forget(key)
        self._addr_to_key = {a: k for a, k in self._addr_to_key.items() if k != key}
        sub = self._subscriber
        if sub is not None and key in sub.connected():
            with contextlib.suppress(RuntimeError):
                self._spawn(sub.disconnect_endpoint(key))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run ``coro`` in the background, keeping a reference until it ends."""
        t = asyncio.get_running_loop().create_task(coro)
        self._background.add(t)
        t.add_done_callback(self._background.discard)

    # ------------------------------------------------------------------ request path

    def keyer_for(self, endpoints: Sequence[EndpointView]) -> BlockKeyer | None:
        """The request-side keyer: configured block size / algo, else the pool's
        ``cache_config_info`` (first endpoint that reports it)."""
        if self.rekey:
            return self._rekeyer
        bs = self.block_size
        algo = self.hash_algo
        if bs is None or algo is None:
            for e in endpoints:
                if bs is None and e.metrics.block_size:
                    bs = e.metrics.block_size
                if algo is None and e.metrics.hash_algo:
                    algo = e.metrics.hash_algo
            if bs is None:
                return None
            algo = algo or "sha256"
        k = (bs, algo, self.hash_seed)
        keyer = self._keyers.get(k)
        if keyer is None:
            try:
                keyer = EngineKeyer(bs, algo, self.hash_seed)
            except ValueError:
                log.warning("%s: unknown hash algo %r; using sha256", self.name, algo)
                keyer = EngineKeyer(bs, "sha256", self.hash_seed)
            if len(self._keyers) > 16:
                self._keyers.clear()
            self._keyers[k] = keyer
        return keyer

    def _tokenizers_for(self, endpoints: Sequence[EndpointView]) -> list[RequestTokenizer]:
        """The configured tokenizer, or the engines' ``/tokenize``: any pool member
        tokenizes the same model, so ask the least busy one and, when it fails, the
        next (results are shared across engines: no cache hits are lost)."""
        if self.tokenizer is not None:
            return [self.tokenizer]
        if self.tokenizer_source != "vllm" or not endpoints:
            return []
        ranked = sorted(
            endpoints, key=lambda e: (e.stale, e.metrics.waiting + e.metrics.running, e.key)
        )
        return [self._engine_client(e.key) for e in ranked[:2]]

    def _engine_client(self, key: str) -> VllmTokenizeClient:
        client = self._engine_tokenizers.get(key)
        if client is None:
            if self._http is None:
                self._http = aiohttp.ClientSession()
            if len(self._engine_tokenizers) > 256:
                self._engine_tokenizers.clear()  # clients share one session: nothing leaks
            client = VllmTokenizeClient(
                f"http://{key}", session=self._http, shared=self._tokenize_cache
            )
            self._engine_tokenizers[key] = client
        return client

    async def prepare_data(
        self, cycle: CycleState, request: LLMRequest, endpoints: list[EndpointView]
    ) -> None:
        if self._task is None:
            with contextlib.suppress(RuntimeError):
                self.start()
        t0 = time.perf_counter()
        try:
            await self._prepare(cycle, request, endpoints)
        finally:
            dt = time.perf_counter() - t0
            self._prepare_metric.observe(dt)
            self.prepare_durations.append(dt)

    async def _prepare(
        self, cycle: CycleState, request: LLMRequest, endpoints: list[EndpointView]
    ) -> None:
        tokens = request.token_ids
        if tokens is None:
            tokens = await self._tokenize(request, endpoints)
            if tokens is None:
                return
            request.token_ids = tokens
            request.prompt_tokens = len(tokens)
        keyer = self.keyer_for(endpoints)
        if keyer is None:
            return
        extras = self._extras(request, endpoints)
        if len(tokens) // keyer.block_size > self.cooperative_threshold_blocks:
            keys = await keys_cooperative(keyer, tokens, extras)
        else:
            keys = keyer.keys(tokens, extras)
        cycle.values[self.name + ":keys"] = _Keys(keys, keyer.block_size)

    @staticmethod
    def _extras(request: LLMRequest, endpoints: Sequence[EndpointView]) -> RequestExtras:
        """vLLM's hash extras: ``cache_salt``, and the LoRA name when the requested
        model is an adapter some endpoint has (active or waiting)."""
        lora = None
        for e in endpoints:
            m = e.metrics
            if request.model in m.active_loras or request.model in m.waiting_loras:
                lora = request.model
                break
        if lora is None and not request.cache_salt:
            return NO_EXTRAS
        return RequestExtras(lora_name=lora, cache_salt=request.cache_salt or None)

    async def _tokenize(
        self, request: LLMRequest, endpoints: Sequence[EndpointView]
    ) -> list[int] | None:
        body: Mapping[str, Any] = request.body or {}
        prompt = body.get("prompt")
        if isinstance(prompt, list) and prompt and all(type(t) is int for t in prompt):
            return list(prompt)
        messages = body.get("messages")
        for tok in self._tokenizers_for(endpoints):
            try:
                if isinstance(messages, list):
                    res = await tok.tokenize(request.model, messages=messages)
                elif isinstance(prompt, str):
                    res = await tok.tokenize(request.model, prompt=prompt)
                elif request.prompt:
                    res = await tok.tokenize(request.model, prompt=request.prompt)
                else:
                    return None
            except TokenizeError as e:
                log.debug("%s: tokenization failed: %s", self.name, e)
                continue
            return res.token_ids
        return None

    def produce(
        self, cycle: CycleState, request: LLMRequest, endpoints: list[EndpointView]
    ) -> None:
        k = cycle.values.get(self.name + ":keys")
        if not isinstance(k, _Keys):
            return
        matches = self.index.match(k.keys, [e.key for e in endpoints]) if k.keys else {}
        info = PrefixMatchInfo(
            total_blocks=len(k.keys), block_tokens=k.block_size, matches=matches, hashes=k.keys
        )
        self.publish(cycle, info)

    def pre_request(
        self,
        cycle: CycleState,
        request: LLMRequest,
        result: SchedulingResult,
        headers: dict[str, str],
    ) -> None:
        info = self.hashed_match_info(cycle)
        if info is None:
            return
        primary = result.primary.targets[0].key
        self._hit_ratio.observe(info.matches.get(primary, 0) / info.total_blocks)
        if not self.speculative:
            return
        for endpoint in routed_endpoints(result, self.datastore):
            self.index.speculate(endpoint, info.hashes)

    def response_complete(
        self,
        cycle: CycleState,
        request: LLMRequest,
        result: SchedulingResult,
        served: str | None,
        status: int | None,
    ) -> None:
        if not self.speculative:
            return
        endpoint = served_elsewhere(result, served, status, self.datastore)
        if endpoint is None:
            return
        info = self.hashed_match_info(cycle)
        if info is not None:
            self.index.speculate(endpoint, info.hashes)


@register
class PrecisePrefixCacheScorer(PrefixCacheScorer):
    """llm-d's older all-in-one type: a precise producer plus ``matched / total``
    (the prefix-cache-scorer's formula, with its own producer)."""

    type_name = "precise-prefix-cache-scorer"

    @classmethod
    def from_params(cls, name: str, params: Params, ctx: BuildContext) -> Self:
        kwargs = PrecisePrefixCacheProducer.parse_params(params, ctx)
        params.finish()
        producer = PrecisePrefixCacheProducer(f"{name}-producer", datastore=ctx.datastore, **kwargs)
        ctx.on_endpoint_removed(producer._endpoint_removed)
        ctx.implicit.append(producer)
        return cls(name, producer)


def _tcp(address: str, port: int) -> str:
    host = f"[{address}]" if ":" in address and not address.startswith("[") else address
    return f"tcp://{host}:{port}"
