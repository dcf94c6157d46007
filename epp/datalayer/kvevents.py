"""Ingest the engines' KV-cache events over ZMQ into the precise KV-block index.

Wire format (vLLM ``ZmqEventPublisher``): three frames ``[topic, seq, payload]``;
``seq`` is an 8-byte big-endian counter per publisher starting at 0; ``payload``
is msgpack ``EventBatch``. vLLM 0.32 sends ``[ts, [events], dp_rank]`` with each
event a map tagged by ``"type"``; newer vLLM encodes the batch as a map and older
vLLM encoded events as tagged arrays. All three decode here, with typed msgspec
structs that skip ``token_ids`` unless the index re-keys from tokens (so the hot
path never materializes 128 Python ints per block). Nothing is ever unpickled.

Socket topologies (both supported, also mixed):

* **connect** (llm-d ``discoverPods``): one SUB per endpoint connects to the
  engine's bound PUB (``tcp://*:5557`` on the engine). The subscription names the
  endpoint; the topic is only filtered.
* **bind** (llm-d ``zmqEndpoint``): one SUB bound by the EPP; engines connect to it
  (vLLM connects unless its endpoint is a wildcard or ipc). The topic
  ``kv@<host>@<model>`` names the endpoint through a :class:`TopicResolver`;
  messages from unknown endpoints are counted and dropped, so strangers cannot
  grow the index.

Reliability: per-endpoint sequence tracking. A gap (seq jumps ahead) asks the
engine's replay ROUTER (when configured) for the missing batches: the request is
``[b"", start_seq as 8 bytes big-endian]`` on a DEALER; replies stream as
``[b"", seq, payload]`` and end with seq ``-1`` (eight 0xFF bytes) and an empty
payload. While a replay is in flight that endpoint's live messages wait in a
bounded buffer; the other endpoints are not held up. A sequence that goes
backwards means the engine restarted: that endpoint is purged. In connect mode a
socket monitor also marks each disconnect, so a restarted engine whose first
messages were lost (its sequence then looks like a forward gap) is recognised by
the discontinuity right after the reconnect, purged, and rebuilt from its replay
buffer. Oversized and
malformed messages are counted (``llm_d_epp_kv_events{outcome=...}``) and dropped;
the subscriber keeps running.

Event loop hygiene: sockets have a receive high-water mark (ZMQ drops beyond it,
which then shows up as a gap and is replayed); each reader drains at most
``batch_messages`` ready messages before yielding to the loop; applying a batch is
synchronous and takes microseconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import msgspec
import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from epp.index.kvblock import KVBlockIndex, UnknownEndpoint
from epp.metrics import KV_EVENTS
from pdroute.protocol.blockhash import to_event_hash

log = logging.getLogger(__name__)

END_SEQ = b"\xff" * 8
_MASK64 = (1 << 64) - 1

# --------------------------------------------------------------------------- decoding

_Hash = int | bytes


class _Stored(msgspec.Struct, tag="BlockStored", tag_field="type"):
    block_hashes: list[_Hash]
    parent_block_hash: _Hash | None = None
    token_ids: msgspec.Raw = msgspec.Raw(b"")
    block_size: int = 0
    medium: str | None = None
    group_idx: int | None = None
    kv_cache_spec_kind: str | None = None


class _StoredLean(msgspec.Struct, tag="BlockStored", tag_field="type"):
    """Direct mode: ``token_ids`` is not even wrapped (msgspec skips it)."""

    block_hashes: list[_Hash]
    parent_block_hash: _Hash | None = None
    medium: str | None = None
    group_idx: int | None = None
    kv_cache_spec_kind: str | None = None


class _Removed(msgspec.Struct, tag="BlockRemoved", tag_field="type"):
    block_hashes: list[_Hash]
    medium: str | None = None
    group_idx: int | None = None


class _Cleared(msgspec.Struct, tag="AllBlocksCleared", tag_field="type"):
    medium: str | None = None


class _BatchA(msgspec.Struct, array_like=True):
    """vLLM 0.32: ``[ts, [map events], dp_rank]``."""

    ts: float
    events: list[_Stored | _Removed | _Cleared]
    data_parallel_rank: int | None = None


class _BatchM(msgspec.Struct):
    """Newer vLLM: the batch is a map."""

    ts: float
    events: list[_Stored | _Removed | _Cleared]
    data_parallel_rank: int | None = None


class _BatchALean(msgspec.Struct, array_like=True):
    ts: float
    events: list[_StoredLean | _Removed | _Cleared]
    data_parallel_rank: int | None = None


class _BatchMLean(msgspec.Struct):
    ts: float
    events: list[_StoredLean | _Removed | _Cleared]
    data_parallel_rank: int | None = None


class _StoredL(msgspec.Struct, array_like=True, tag="BlockStored"):
    block_hashes: list[_Hash]
    parent_block_hash: _Hash | None
    token_ids: msgspec.Raw
    block_size: int
    lora_id: int | None = None
    medium: str | None = None


class _RemovedL(msgspec.Struct, array_like=True, tag="BlockRemoved"):
    block_hashes: list[_Hash]
    medium: str | None = None


class _ClearedL(msgspec.Struct, array_like=True, tag="AllBlocksCleared"):
    pass


class _BatchL(msgspec.Struct, array_like=True):
    """Older vLLM: events are tagged arrays ``["BlockStored", hashes, ...]``."""

    ts: float
    events: list[_StoredL | _RemovedL | _ClearedL]
    data_parallel_rank: int | None = None


_DECODERS = (
    msgspec.msgpack.Decoder(_BatchA),
    msgspec.msgpack.Decoder(_BatchM),
    msgspec.msgpack.Decoder(_BatchL),
)
_LEAN_DECODERS = (
    msgspec.msgpack.Decoder(_BatchALean),
    msgspec.msgpack.Decoder(_BatchMLean),
    msgspec.msgpack.Decoder(_BatchL),
)
_tokens_decoder = msgspec.msgpack.Decoder(list[int])


def decode_batch(payload: bytes, *, tokens: bool = True) -> list[Any]:
    """The events of one payload; raises ``msgspec.DecodeError`` (or
    ``ValidationError``) when no known encoding fits. ``tokens=False`` skips
    ``token_ids`` (direct mode)."""
    err: Exception | None = None
    for dec in _DECODERS if tokens else _LEAN_DECODERS:
        try:
            return dec.decode(payload).events  # type: ignore[no-any-return]
        except Exception as e:  # DecodeError, ValidationError, UnicodeDecodeError, ...
            err = err or e
    assert err is not None
    raise err


#: KV-cache group kinds whose blocks are a reusable prefix (vLLM 0.32 publishes
#: ``kv_cache_spec_kind``; sliding-window / mamba groups of hybrid models are not).
PREFIX_KINDS = frozenset({"full_attention", "mla_attention", "sink_full_attention"})


def _int_hashes(hashes: list[_Hash]) -> list[int]:
    return [h if isinstance(h, int) else to_event_hash(h) for h in hashes]


def _int_hash(h: _Hash) -> int:
    return h if isinstance(h, int) else to_event_hash(h)


# --------------------------------------------------------------------------- the sync core

Outcome = str
_OUTCOMES = (
    "applied",
    "oversized",
    "malformed",
    "unknown_endpoint",
    "gap",
    "replayed",
    "gap_unrecovered",
    "restart",
    "orphan",
    "dropped",
    "filtered",
)


@dataclass(frozen=True, slots=True)
class ReplayRequest:
    endpoint: str
    #: First missing sequence number (inclusive).
    start: int
    #: The sequence that revealed the gap (exclusive end of the replay).
    until: int


@dataclass
class _Stream:
    last: int | None = None
    replaying: bool = False
    #: The transport reconnected since the last message: the engine may have
    #: restarted (its sequence starts again at 0, and the first messages may be lost).
    suspect: bool = False
    pending: deque[tuple[int, bytes]] = field(default_factory=deque)


class KVEventIngestor:
    """Decode and apply event messages for one index; track per-endpoint sequences.

    Synchronous and socket-free: :class:`KVEventSubscriber` feeds it. Counts every
    outcome in ``counts`` and in ``llm_d_epp_kv_events``.
    """

    def __init__(
        self,
        index: KVBlockIndex,
        *,
        max_message_bytes: int = 16 << 20,
        max_pending: int = 10_000,
    ) -> None:
        self.index = index
        self.max_message_bytes = max_message_bytes
        self.max_pending = max_pending
        self._streams: dict[str, _Stream] = {}
        #: Per endpoint: KV-cache groups whose events are not prefix blocks.
        self._skip_groups: dict[str, set[int]] = {}
        self.counts: dict[str, int] = dict.fromkeys(_OUTCOMES, 0)
        self._metric = {o: KV_EVENTS.labels(o) for o in _OUTCOMES}
        self._unflushed = 0

    def count(self, outcome: str, n: int = 1) -> None:
        self.counts[outcome] += n
        self._metric[outcome].inc(n)

    def last_seq(self, endpoint: str) -> int | None:
        st = self._streams.get(endpoint)
        return None if st is None else st.last

    def forget(self, endpoint: str) -> None:
        """The endpoint left: drop its stream state and purge it from the index."""
        self._streams.pop(endpoint, None)
        self._skip_groups.pop(endpoint, None)
        self.index.remove_endpoint(endpoint)

    def on_message(
        self, endpoint: str, seq: int, payload: bytes, *, can_replay: bool = False
    ) -> ReplayRequest | None:
        """Handle one live message. Returns a replay request when a gap should be
        filled (only if ``can_replay``); the caller then calls :meth:`replay_done`."""
        st = self._streams.get(endpoint)
        if st is None:
            st = self._streams[endpoint] = _Stream()
        if st.replaying:
            if len(st.pending) >= self.max_pending:
                st.pending.popleft()
                self.count("dropped")
            st.pending.append((seq, payload))
            return None
        last = st.last
        if st.suspect:
            st.suspect = False
            if last is not None and seq != last + 1:
                # After a reconnect a discontinuity means a new engine incarnation
                # (an old one would continue at last + 1): purge, then rebuild from
                # its replay buffer like a first contact.
                self.count("restart")
                log.info(
                    "kv events: %s reconnected at seq %d (was %d); purging", endpoint, seq, last
                )
                self.index.clear(endpoint)
                st.last = last = None
        if last is None:
            if seq > 0 and can_replay:
                return self._start_replay(endpoint, st, 0, seq, payload)
        elif seq <= last:
            self.count("restart")
            log.info("kv events: %s restarted (seq %d after %d); purging", endpoint, seq, last)
            self.index.clear(endpoint)
        elif seq != last + 1:
            if can_replay:
                return self._start_replay(endpoint, st, last + 1, seq, payload)
            self.count("gap")
            self.count("gap_unrecovered", seq - last - 1)
        st.last = seq
        self.apply(endpoint, payload)
        return None

    def on_reconnect(self, endpoint: str) -> None:
        """The connection to ``endpoint``'s publisher dropped (socket monitor)."""
        st = self._streams.get(endpoint)
        if st is not None:
            st.suspect = True

    def _start_replay(
        self, endpoint: str, st: _Stream, start: int, seq: int, payload: bytes
    ) -> ReplayRequest:
        if start > 0:
            self.count("gap")
        st.replaying = True
        st.pending.append((seq, payload))
        return ReplayRequest(endpoint, start, seq)

    def replay_done(
        self, req: ReplayRequest, messages: list[tuple[int, bytes]] | None
    ) -> ReplayRequest | None:
        """Apply replayed ``(seq, payload)`` messages (None: replay failed), then the
        live messages that waited. May return a new replay request when the
        waiting messages themselves have a gap."""
        st = self._streams.get(req.endpoint)
        if st is None:
            return None
        st.replaying = False
        got = set()
        if messages:
            for seq, payload in messages:
                if req.start <= seq < req.until and seq not in got:
                    got.add(seq)
                    self.apply(req.endpoint, payload)
                    self.count("replayed")
        missing = (req.until - req.start) - len(got)
        if missing:
            self.count("gap_unrecovered", missing)
        if got or req.start > 0:
            st.last = req.until - 1
        pending = st.pending
        st.pending = deque()
        for seq, payload in pending:
            nxt = self.on_message(req.endpoint, seq, payload, can_replay=False)
            assert nxt is None
        return None

    def apply(self, endpoint: str, payload: bytes) -> int:
        """Decode ``payload`` and apply its events; returns the events applied.

        Hot path: consecutive BlockStored events are handed to the index as one
        run; "applied" is counted locally and flushed to Prometheus by
        :meth:`flush_metrics` (a lock per message would cost more than the apply).
        """
        if len(payload) > self.max_message_bytes:
            self.count("oversized")
            return 0
        index = self.index
        rekey = index.rekeying
        try:
            events = decode_batch(payload, tokens=rekey)
        except Exception:  # hostile bytes must never stop the subscriber
            self.count("malformed")
            return 0
        try:
            s = index.slot(endpoint)
        except UnknownEndpoint:
            self.count("unknown_endpoint")
            return 0
        runs: list[list[int]] = []
        orphans = 0
        skipped = 0
        for ev in events:
            t = type(ev)
            if t is _StoredLean or t is _Stored or t is _StoredL:
                if t is not _StoredL:
                    kind = ev.kv_cache_spec_kind
                    if kind is not None and kind not in PREFIX_KINDS:
                        if ev.group_idx is not None:
                            self._skip_groups.setdefault(endpoint, set()).add(ev.group_idx)
                        skipped += 1
                        continue
                hashes = ev.block_hashes
                if hashes and type(hashes[0]) is not int:
                    hashes = _int_hashes(hashes)
                if not rekey:
                    runs.append(hashes)
                    continue
                try:
                    tokens = _tokens_decoder.decode(ev.token_ids)
                except Exception:
                    self.count("malformed")
                    continue
                parent = ev.parent_block_hash
                if not index.store_tokens(
                    s, hashes, None if parent is None else _int_hash(parent), tokens
                ):
                    orphans += 1
                continue
            if runs:
                index.store_runs(s, runs)
                runs = []
            if t is _Removed or t is _RemovedL:
                if t is _Removed and ev.group_idx is not None:
                    skip = self._skip_groups.get(endpoint)
                    if skip and ev.group_idx in skip:
                        skipped += 1
                        continue
                hashes = ev.block_hashes
                if hashes and type(hashes[0]) is not int:
                    hashes = _int_hashes(hashes)
                index.remove(s, hashes)
            else:
                index.clear(endpoint)
        if runs:
            index.store_runs(s, runs)
        n = len(events) - orphans - skipped
        if skipped:
            self.count("filtered", skipped)
        self.counts["applied"] += n
        self._unflushed += n
        if self._unflushed >= 65536:
            self.flush_metrics()
        if orphans:
            self.count("orphan", orphans)
        return n

    def flush_metrics(self) -> None:
        """Push locally counted "applied" events to Prometheus."""
        if self._unflushed:
            self._metric["applied"].inc(self._unflushed)
            self._unflushed = 0


# --------------------------------------------------------------------------- topics


class TopicResolver:
    """Topic -> endpoint key for the bound (shared) socket.

    ``mapping`` gives explicit topics. Otherwise the topic is split on ``@`` and
    field ``host_field`` (vLLM convention ``kv@<podIP>@<model>``: field 1) is
    passed to ``lookup`` (for example the datastore's address -> endpoint key),
    which returns None for strangers.
    """

    def __init__(
        self,
        *,
        mapping: Mapping[str, str] | None = None,
        lookup: Callable[[str], str | None] | None = None,
        host_field: int = 1,
        separator: str = "@",
    ) -> None:
        self._mapping = dict(mapping or {})
        self._lookup = lookup
        self._field = host_field
        self._sep = separator

    def resolve(self, topic: str) -> str | None:
        ep = self._mapping.get(topic)
        if ep is not None or self._lookup is None:
            return ep
        parts = topic.split(self._sep)
        if len(parts) <= self._field:
            return None
        return self._lookup(parts[self._field])


# --------------------------------------------------------------------------- sockets


@dataclass(frozen=True, slots=True)
class SubscriberConfig:
    topic_filter: str = "kv@"
    #: Messages ZMQ queues per socket before dropping (drops become gaps, then
    #: replays). Counted in messages, so memory is about rcvhwm x message size.
    rcvhwm: int = 10_000
    replay_timeout_s: float = 1.0
    max_replay_messages: int = 100_000
    #: Messages drained per wake-up before yielding to the event loop.
    batch_messages: int = 256


class KVEventSubscriber:
    """Owns the ZMQ sockets and feeds a :class:`KVEventIngestor`.

    Use :meth:`connect_endpoint` per engine (connect mode) and/or :meth:`bind`
    (bind mode). :meth:`close` cancels readers and closes sockets.
    """

    def __init__(
        self,
        ingestor: KVEventIngestor,
        *,
        config: SubscriberConfig | None = None,
        context: zmq.asyncio.Context | None = None,
    ) -> None:
        self.ingestor = ingestor
        self.config = config or SubscriberConfig()
        self._ctx = context or zmq.asyncio.Context.instance()
        self._conn: dict[str, tuple[zmq.asyncio.Socket, asyncio.Task[None]]] = {}
        self._monitors: dict[str, tuple[zmq.asyncio.Socket, asyncio.Task[None]]] = {}
        self._bound: list[tuple[zmq.asyncio.Socket, asyncio.Task[None]]] = []
        self._replay_addr: dict[str, str] = {}
        self._replays: set[asyncio.Task[None]] = set()

    # -- topology

    def connected(self) -> list[str]:
        return list(self._conn)

    def connect_endpoint(
        self, endpoint: str, address: str, *, replay_address: str | None = None
    ) -> None:
        """Subscribe to ``endpoint``'s engine publisher at ``address`` (idempotent)."""
        if endpoint in self._conn:
            return
        sock = self._ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.RCVHWM, self.config.rcvhwm)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SUBSCRIBE, self.config.topic_filter.encode())
        sock.connect(address)
        if replay_address:
            self._replay_addr[endpoint] = replay_address
        loop = asyncio.get_running_loop()
        task = loop.create_task(self._read(sock, endpoint, None, None), name=f"kvevents-{endpoint}")
        self._conn[endpoint] = (sock, task)
        # Disconnects are restart suspects (see KVEventIngestor.on_reconnect).
        monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self._monitors[endpoint] = (
            monitor,
            loop.create_task(self._watch(monitor, endpoint), name=f"kvevents-mon-{endpoint}"),
        )

    def set_replay_address(self, endpoint: str, address: str | None) -> None:
        """Change (or drop) ``endpoint``'s replay ROUTER address (connect mode)."""
        if address:
            self._replay_addr[endpoint] = address
        else:
            self._replay_addr.pop(endpoint, None)

    async def _watch(self, monitor: zmq.asyncio.Socket, endpoint: str) -> None:
        while True:
            try:
                frames = await monitor.recv_multipart()
            except zmq.ZMQError:
                return
            try:
                event = parse_monitor_message(frames)["event"]
            except (ValueError, KeyError, struct.error):
                continue
            if event & zmq.EVENT_DISCONNECTED:
                self.ingestor.on_reconnect(endpoint)

    async def disconnect_endpoint(self, endpoint: str, *, purge: bool = True) -> None:
        mon = self._monitors.pop(endpoint, None)
        if mon is not None:
            mon[1].cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await mon[1]
            mon[0].close(linger=0)
        entry = self._conn.pop(endpoint, None)
        self._replay_addr.pop(endpoint, None)
        if entry is not None:
            sock, task = entry
            with contextlib.suppress(zmq.ZMQError):
                sock.disable_monitor()
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            sock.close(linger=0)
        if purge:
            self.ingestor.forget(endpoint)

    def bind(
        self,
        address: str,
        resolver: TopicResolver,
        *,
        replay_address_for: Callable[[str], str | None] | None = None,
    ) -> str:
        """Bind a shared SUB socket engines connect to; returns the bound address
        (useful with port 0)."""
        sock = self._ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.RCVHWM, self.config.rcvhwm)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SUBSCRIBE, self.config.topic_filter.encode())
        if address.startswith("tcp://") and address.endswith(":0"):
            port = sock.bind_to_random_port(address[: -len(":0")])
            bound = f"{address[: -len(':0')]}:{port}"
        else:
            sock.bind(address)
            bound = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        task = asyncio.get_running_loop().create_task(
            self._read(sock, None, resolver, replay_address_for), name=f"kvevents-bind-{bound}"
        )
        self._bound.append((sock, task))
        return bound

    async def close(self) -> None:
        for ep in list(self._conn):
            await self.disconnect_endpoint(ep, purge=False)
        for sock, task in self._bound:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            sock.close(linger=0)
        self._bound.clear()
        for t in list(self._replays):
            t.cancel()
        for t in list(self._replays):
            with contextlib.suppress(asyncio.CancelledError):
                await t

    # -- reading

    async def _read(
        self,
        sock: zmq.asyncio.Socket,
        endpoint: str | None,
        resolver: TopicResolver | None,
        replay_for: Callable[[str], str | None] | None,
    ) -> None:
        batch = self.config.batch_messages
        # A synchronous shadow of the same socket drains ready messages without a
        # future per message; the asyncio socket tries a non-blocking receive
        # before it waits, so no readiness edge is lost.
        drain: zmq.Socket[bytes] = zmq.Socket.shadow(sock.underlying)
        handle = self._handle
        while True:
            try:
                frames = await sock.recv_multipart()
            except zmq.ZMQError as e:  # socket closed under us
                log.warning("kv events reader stopped: %s", e)
                return
            n = 0
            while True:
                try:
                    handle(frames, endpoint, resolver, replay_for)
                except Exception:  # a bug here must not stop the stream
                    log.exception("kv events: failed to handle a message")
                    self.ingestor.count("malformed")
                n += 1
                if n >= batch:
                    break
                try:
                    frames = drain.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
            self.ingestor.flush_metrics()
            if n >= batch:
                await asyncio.sleep(0)

    def _handle(
        self,
        frames: list[bytes],
        endpoint: str | None,
        resolver: TopicResolver | None,
        replay_for: Callable[[str], str | None] | None,
    ) -> None:
        ing = self.ingestor
        if len(frames) != 3 or len(frames[1]) != 8:
            ing.count("malformed")
            return
        topic, seq_b, payload = frames
        if endpoint is None:
            assert resolver is not None
            try:
                endpoint = resolver.resolve(topic.decode())
            except UnicodeDecodeError:
                endpoint = None
            if endpoint is None:
                ing.count("unknown_endpoint")
                return
            replay_addr = replay_for(endpoint) if replay_for else None
        else:
            replay_addr = self._replay_addr.get(endpoint)
        seq = int.from_bytes(seq_b, "big")
        req = ing.on_message(endpoint, seq, payload, can_replay=replay_addr is not None)
        if req is not None and replay_addr is not None:
            t = asyncio.get_running_loop().create_task(self._replay(req, replay_addr))
            self._replays.add(t)
            t.add_done_callback(self._replays.discard)

    async def _replay(self, req: ReplayRequest, address: str) -> None:
        msgs: list[tuple[int, bytes]] | None = None
        try:
            msgs = await fetch_replay(
                self._ctx,
                address,
                req.start,
                timeout_s=self.config.replay_timeout_s,
                max_messages=self.config.max_replay_messages,
                until=req.until,
            )
        except (TimeoutError, zmq.ZMQError) as e:
            log.warning("kv events replay from %s failed: %r", address, e)
        finally:
            self.ingestor.replay_done(req, msgs)


async def fetch_replay(
    ctx: zmq.asyncio.Context,
    address: str,
    start: int,
    *,
    timeout_s: float = 1.0,
    max_messages: int = 100_000,
    until: int | None = None,
) -> list[tuple[int, bytes]]:
    """Ask a vLLM replay ROUTER for every buffered batch with ``seq >= start``.

    Returns ``(seq, payload)`` in order; stops at the end marker, at ``until``
    once reached, or after ``max_messages`` (bounded memory). Raises
    ``TimeoutError`` when the engine does not finish within ``timeout_s``.
    """
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    out: list[tuple[int, bytes]] = []
    try:
        sock.connect(address)
        await sock.send_multipart([b"", start.to_bytes(8, "big")])
        async with asyncio.timeout(timeout_s):
            while len(out) < max_messages:
                frames = await sock.recv_multipart()
                if len(frames) != 3:
                    continue
                _, seq_b, payload = frames
                if seq_b == END_SEQ:
                    break
                if len(seq_b) != 8:
                    continue
                seq = int.from_bytes(seq_b, "big")
                out.append((seq, payload))
                if until is not None and seq >= until - 1:
                    break
    finally:
        sock.close(linger=0)
    return out
