"""Request-side tokenization and block keys for precise prefix-cache routing.

Two halves:

* **Tokenizers** turn a request's prompt (or chat messages) into the token ids the
  engine will see. :class:`LocalTokenizer` loads an HF ``tokenizer.json`` with the
  ``tokenizers`` package (cached per model directory); :class:`VllmTokenizeClient`
  asks the engine's ``/tokenize`` endpoint (vLLM shape: ``{"model", "prompt"}`` or
  ``{"model", "messages"}`` -> ``{"tokens": [...], "count": n}``) and caches answers
  in a bounded LRU keyed by a 128-bit hash of the request; :class:`EstimateTokenizer`
  needs nothing and returns only a token-count estimate (no ids, so no precise
  matching). All are async; local encoding of long prompts runs in a worker thread
  through ``encode_batch``, which releases the GIL (plain ``encode`` holds it for the
  whole call: measured 1.5 s of event-loop stall for a 130k-token prompt).

* **Block keyers** turn token ids into the 64-bit block keys of the KV-block index.
  :class:`EngineKeyer` reproduces vLLM's hashes (``sha256`` pickled tuples or
  ``sha256_cbor``, root from ``PYTHONHASHSEED``) via :mod:`pdroute.protocol.blockhash`
  and memoizes digests by a streaming xxh3 hash of the token prefix, so a request
  that shares a long prefix with an earlier one costs one xxh3 update per block
  instead of a SHA-256 + pickle. :class:`FastKeyer` is the EPP's own chained xxh3
  key, used in *re-key* mode where the index recomputes keys from the events'
  ``token_ids`` (the engine's hash algorithm need not be known).
"""

from __future__ import annotations

import asyncio
from array import array
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import aiohttp
import msgspec
import xxhash

from pdroute.protocol.blockhash import hash_function, none_hash, to_event_hash

# --------------------------------------------------------------------------- keyers


@dataclass(frozen=True, slots=True)
class RequestExtras:
    """What vLLM mixes into block hashes besides tokens (``extra_keys``): the LoRA
    adapter name on every block and ``cache_salt`` on the first block only
    (multimodal and prompt-embedding keys are not supported: such prompts get no
    precise match rather than a wrong one)."""

    lora_name: str | None = None
    cache_salt: str | None = None


NO_EXTRAS = RequestExtras()


class BlockKeyer(Protocol):
    block_size: int

    def keys(self, tokens: Sequence[int], extras: RequestExtras = NO_EXTRAS) -> list[int]:
        """One key per full block of ``tokens``, chained from the root."""
        ...

    def iter_keys(self, tokens: Sequence[int], extras: RequestExtras = NO_EXTRAS) -> Iterator[int]:
        """The same keys, lazily."""
        ...


async def keys_cooperative(
    keyer: BlockKeyer,
    tokens: Sequence[int],
    extras: RequestExtras = NO_EXTRAS,
    *,
    chunk_blocks: int = 128,
) -> list[int]:
    """``keyer.keys(tokens)`` for long prompts without stalling the event loop:
    yields to the loop every ``chunk_blocks`` blocks (about a millisecond of
    SHA-256 work). Cheaper than a worker thread, which contends for the GIL."""
    out: list[int] = []
    append = out.append
    it = keyer.iter_keys(tokens, extras)
    while True:
        for _ in range(chunk_blocks):
            k = next(it, None)
            if k is None:
                return out
            append(k)
        await asyncio.sleep(0)


class EngineKeyer:
    """vLLM-compatible block keys (what the engine publishes in ``block_hashes``).

    Invariant: ``keys(t)[i] == to_event_hash(chain_block_hashes(t, block_size, algo,
    seed=seed)[i])``; the memo only short-cuts recomputation and is bounded.
    """

    def __init__(
        self,
        block_size: int,
        hash_algo: str = "sha256",
        seed: str | None = None,
        *,
        memo_entries: int = 262_144,
    ) -> None:
        if block_size <= 0:
            raise ValueError("block_size must be positive")
        self.block_size = block_size
        self.hash_algo = hash_algo
        self.seed = seed
        self._hash = hash_function(hash_algo)
        self._root = none_hash(self._hash, seed)
        self._memo: OrderedDict[bytes, tuple[bytes, int]] = OrderedDict()
        self._memo_entries = memo_entries

    def keys(self, tokens: Sequence[int], extras: RequestExtras = NO_EXTRAS) -> list[int]:
        return list(self.iter_keys(tokens, extras))

    def iter_keys(self, tokens: Sequence[int], extras: RequestExtras = NO_EXTRAS) -> Iterator[int]:
        """The keys one by one (lets :func:`keys_cooperative` yield to the loop)."""
        bs = self.block_size
        n = len(tokens) // bs
        if n == 0:
            return
        memo = self._memo
        mget = memo.get
        h = xxhash.xxh3_128()
        lora, salt = extras.lora_name, extras.cache_salt
        rest_extra: tuple[str, ...] | None = (lora,) if lora else None
        first_extra: tuple[str, ...] | None = ((lora,) if lora else ()) + (
            (salt,) if salt else ()
        ) or None
        if first_extra:
            # Separate memo namespace per adapter/salt (their digests differ).
            h.update(b"\x00" + _enc.encode((lora, salt)))
        update = h.update
        prefix_id = h.digest
        view = memoryview(_token_bytes(tokens, n * bs))
        step = bs * 4
        hash_fn = self._hash
        parent = self._root
        for i in range(n):
            update(view[i * step : (i + 1) * step])
            pid = prefix_id()
            hit = mget(pid)
            if hit is None:
                extra = first_extra if i == 0 else rest_extra
                d = hash_fn((parent, tuple(tokens[i * bs : (i + 1) * bs]), extra))
                hit = (d, to_event_hash(d))
                memo[pid] = hit
                if len(memo) > self._memo_entries:
                    memo.popitem(last=False)
            yield hit[1]
            parent = hit[0]


class FastKeyer:
    """The EPP's own chained block key: ``k_i = xxh3_64(tokens_i, seed=k_{i-1})``.

    Used for re-keying: the index recomputes keys from BlockStored ``token_ids``
    with :meth:`chain` and requests use :meth:`keys`, so both sides agree whatever
    hash the engine uses.
    """

    def __init__(self, block_size: int, seed: str | None = None) -> None:
        if block_size <= 0:
            raise ValueError("block_size must be positive")
        self.block_size = block_size
        self._root = xxhash.xxh3_64_intdigest((seed or "pdroute-root").encode())

    def keys(self, tokens: Sequence[int], extras: RequestExtras = NO_EXTRAS) -> list[int]:
        """Extras are ignored: events do not carry them in a form re-keying uses,
        so LoRA/salted blocks share keys with the base model in re-key mode."""
        return self.chain(None, tokens)

    def iter_keys(self, tokens: Sequence[int], extras: RequestExtras = NO_EXTRAS) -> Iterator[int]:
        return iter(self.chain(None, tokens))

    def chain(self, parent: int | None, tokens: Sequence[int]) -> list[int]:
        bs = self.block_size
        n = len(tokens) // bs
        if n == 0:
            return []
        buf = _token_bytes(tokens, n * bs)
        step = bs * 4
        k = self._root if parent is None else parent
        digest = xxhash.xxh3_64_intdigest
        out = []
        for i in range(0, n * step, step):
            k = digest(buf[i : i + step], seed=k)
            out.append(k)
        return out


def _token_bytes(tokens: Sequence[int], n: int) -> bytes:
    try:
        return array("I", tokens[:n] if len(tokens) != n else tokens).tobytes()
    except (OverflowError, TypeError):
        # Ids outside uint32 (never seen in practice): fall back to 8 bytes/token
        # by folding, keeping 4 bytes per token for a fixed stride.
        return array("I", [t & 0xFFFFFFFF for t in tokens[:n]]).tobytes()


# --------------------------------------------------------------------------- tokenizers


@dataclass(frozen=True, slots=True)
class TokenizedPrompt:
    #: Token ids as the engine sees them, or None when only estimated.
    token_ids: list[int] | None
    count: int

    @property
    def exact(self) -> bool:
        return self.token_ids is not None


class TokenizeError(Exception):
    """Tokenization failed (engine unreachable, bad answer, missing files)."""


class RequestTokenizer(Protocol):
    async def tokenize(
        self,
        model: str,
        *,
        prompt: str | None = None,
        messages: Sequence[Mapping[str, Any]] | None = None,
    ) -> TokenizedPrompt: ...


class EstimateTokenizer:
    """No tokenizer at all: about 4 characters per token, no ids."""

    def __init__(self, chars_per_token: float = 4.0) -> None:
        self.chars_per_token = chars_per_token

    async def tokenize(
        self,
        model: str,
        *,
        prompt: str | None = None,
        messages: Sequence[Mapping[str, Any]] | None = None,
    ) -> TokenizedPrompt:
        return TokenizedPrompt(None, estimate_count(prompt, messages, self.chars_per_token))


def estimate_count(
    prompt: str | None, messages: Sequence[Mapping[str, Any]] | None, chars_per_token: float = 4.0
) -> int:
    n = len(prompt) if prompt else 0
    for m in messages or ():
        c = m.get("content")
        if isinstance(c, str):
            n += len(c) + 8
        elif isinstance(c, list):
            for part in c:
                if isinstance(part, Mapping) and isinstance(part.get("text"), str):
                    n += len(part["text"])
    return int(n / chars_per_token + 0.5)


class _LRU:
    """Tiny bounded LRU of tokenization results."""

    def __init__(self, entries: int) -> None:
        self._d: OrderedDict[bytes, list[int]] = OrderedDict()
        self._n = entries

    def get(self, key: bytes) -> list[int] | None:
        v = self._d.get(key)
        if v is not None:
            self._d.move_to_end(key)
        return v

    def put(self, key: bytes, value: list[int]) -> None:
        self._d[key] = value
        self._d.move_to_end(key)
        while len(self._d) > self._n:
            self._d.popitem(last=False)

    def __len__(self) -> int:
        return len(self._d)


_enc = msgspec.json.Encoder()


def _cache_key(model: str, prompt: str | None, messages: Any) -> bytes:
    return xxhash.xxh3_128_digest(_enc.encode((model, prompt, messages)))


class LocalTokenizer:
    """HF ``tokenizer.json`` via the ``tokenizers`` package.

    Chat messages are rendered with a plain ``role: content`` layout (no Jinja chat
    template): ids then differ from the engine's chat ids, so for chat the engine's
    ``/tokenize`` is preferred. Prompts longer than ``thread_threshold_chars`` are
    encoded in a worker thread.
    """

    _loaded: dict[Path, Any] = {}

    def __init__(
        self,
        model_dir: str | Path,
        *,
        add_special_tokens: bool = True,
        thread_threshold_chars: int = 16_384,
        cache_entries: int = 4096,
    ) -> None:
        path = Path(model_dir)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise TokenizeError(f"no tokenizer.json at {file}")
        tok = self._loaded.get(file)
        if tok is None:
            from tokenizers import Tokenizer

            tok = Tokenizer.from_file(str(file))
            self._loaded[file] = tok
        self._tok = tok
        self._special = add_special_tokens
        self._threshold = thread_threshold_chars
        self._cache = _LRU(cache_entries)

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=self._special).ids)

    def encode_nogil(self, text: str) -> list[int]:
        """Same ids; ``encode_batch`` releases the GIL while Rust works (``encode``
        does not), so a worker thread does not stall the event loop."""
        return list(self._tok.encode_batch([text], add_special_tokens=self._special)[0].ids)

    async def tokenize(
        self,
        model: str,
        *,
        prompt: str | None = None,
        messages: Sequence[Mapping[str, Any]] | None = None,
    ) -> TokenizedPrompt:
        if prompt is None:
            prompt = "\n".join(
                f"{m.get('role', '')}: {m.get('content', '')}" for m in messages or ()
            )
        key = _cache_key(model, prompt, None)
        ids = self._cache.get(key)
        if ids is None:
            if len(prompt) >= self._threshold:
                ids = await asyncio.to_thread(self.encode_nogil, prompt)
            else:
                ids = self.encode(prompt)
            self._cache.put(key, ids)
        return TokenizedPrompt(ids, len(ids))


class TokenizeCache:
    """Results and in-flight calls shared by several :class:`VllmTokenizeClient`
    (one per engine), so a prompt is tokenized once whichever engine answers."""

    def __init__(self, entries: int = 8192) -> None:
        self.results = _LRU(entries)
        self.inflight: dict[bytes, asyncio.Future[list[int]]] = {}


class _TokenizeAnswer(msgspec.Struct):
    tokens: list[int]
    count: int | None = None


class VllmTokenizeClient:
    """The engine's ``POST /tokenize`` with a bounded result cache.

    ``base_url`` is e.g. ``http://10.0.0.5:8000``. Concurrent requests for the same
    prompt share one HTTP call.
    """

    def __init__(
        self,
        base_url: str,
        *,
        session: aiohttp.ClientSession | None = None,
        timeout_s: float = 2.0,
        cache_entries: int = 4096,
        max_answer_bytes: int = 64 << 20,
        shared: TokenizeCache | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._session = session
        self._own_session = session is None
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        shared = shared or TokenizeCache(cache_entries)
        self._cache = shared.results
        self._inflight = shared.inflight
        self._max_answer = max_answer_bytes
        self._decoder = msgspec.json.Decoder(_TokenizeAnswer)
        self.calls = 0

    async def close(self) -> None:
        if self._own_session and self._session is not None:
            await self._session.close()
            self._session = None

    async def tokenize(
        self,
        model: str,
        *,
        prompt: str | None = None,
        messages: Sequence[Mapping[str, Any]] | None = None,
    ) -> TokenizedPrompt:
        if prompt is None and messages is None:
            raise TokenizeError("nothing to tokenize")
        key = _cache_key(model, prompt, messages)
        ids = self._cache.get(key)
        if ids is not None:
            return TokenizedPrompt(ids, len(ids))
        fut = self._inflight.get(key)
        if fut is not None:
            ids = await asyncio.shield(fut)
            return TokenizedPrompt(ids, len(ids))
        fut = asyncio.get_running_loop().create_future()
        self._inflight[key] = fut
        try:
            body: dict[str, Any] = {"model": model}
            if prompt is not None:
                body["prompt"] = prompt
            else:
                body["messages"] = list(messages or ())
            ids = await self._post(_enc.encode(body))
            self._cache.put(key, ids)
            fut.set_result(ids)
        except asyncio.CancelledError:
            # Waiters sharing this call get an error; cancellation itself propagates.
            fut.set_exception(TokenizeError("/tokenize cancelled"))
            fut.exception()  # mark retrieved
            raise
        except Exception as e:
            err = e if isinstance(e, TokenizeError) else TokenizeError(f"/tokenize failed: {e!r}")
            fut.set_exception(err)
            fut.exception()  # mark retrieved
            raise err from e
        finally:
            del self._inflight[key]
        return TokenizedPrompt(ids, len(ids))

    async def _post(self, body: bytes) -> list[int]:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        self.calls += 1
        async with self._session.post(
            self.base_url + "/tokenize",
            data=body,
            headers={"content-type": "application/json"},
            timeout=self._timeout,
        ) as resp:
            raw = await resp.content.read(self._max_answer + 1)
            if len(raw) > self._max_answer:
                raise TokenizeError("/tokenize answer too large")
            if resp.status != 200:
                raise TokenizeError(f"/tokenize HTTP {resp.status}: {raw[:200]!r}")
            try:
                return self._decoder.decode(raw).tokens
            except msgspec.DecodeError as e:
                raise TokenizeError(f"/tokenize bad answer: {e}") from e
