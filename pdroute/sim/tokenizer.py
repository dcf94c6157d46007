"""A deterministic local tokenizer and chat template (no downloads, no model files).

Design: text is split into pieces (runs of word characters, runs of spaces, single
other characters); each piece maps to a token id with a keyed BLAKE2b hash, so the
same text gives the same ids in every process and on every machine (no dependence on
``PYTHONHASHSEED``). Ids below :data:`FIRST_PIECE_ID` are reserved for special tokens.

Generated text alternates words from :data:`OUTPUT_WORDS` and single spaces, and the
generated ids are exactly the ids the tokenizer gives that text ("word word word").
So an assistant reply sent back in the next chat turn re-tokenizes to the tokens the
server generated, and the next turn hits the blocks cached while generating, as with
a real model and its tokenizer.

The point is not linguistic fidelity but the properties the routing stack relies on:
the same prompt prefix always yields the same token prefix (hence the same vLLM
block hashes), and token counts grow with text length roughly like a BPE tokenizer's.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from typing import Any

BOS_ID = 1
EOS_ID = 2
FIRST_PIECE_ID = 16
#: Generated text is drawn from this fixed vocabulary (alternating with " ").
OUTPUT_WORDS: tuple[str, ...] = tuple(
    [
        "",
        "the",
        "a",
        "of",
        "to",
        "and",
        "in",
        "is",
        "it",
        "that",
        "for",
        "on",
        "with",
        "as",
        "was",
        "at",
        "by",
        "be",
        "this",
        "are",
        "from",
        "or",
        "an",
        "have",
        "not",
        "they",
        "which",
        "one",
        "you",
        "were",
        "her",
        "all",
        "she",
        "there",
        "would",
        "their",
        "we",
        "him",
        "been",
        "has",
        "when",
        "who",
        "will",
        "more",
        "no",
        "if",
        "out",
        "so",
        "said",
        "what",
        "up",
        "its",
        "about",
        "into",
        "than",
        "them",
        "can",
        "only",
        "other",
        "new",
        "some",
        "could",
        "time",
        "these",
        "two",
        "may",
        "then",
        "do",
        "first",
        "any",
        "my",
        "now",
        "such",
        "like",
        "our",
        "over",
        "man",
        "me",
        "even",
        "most",
        "made",
        "after",
        "also",
        "did",
        "many",
        "before",
        "must",
        "through",
        "back",
        "years",
        "where",
        "much",
        "your",
        "way",
        "well",
        "down",
        "should",
        "because",
        "each",
        "just",
        "those",
        "people",
        "how",
        "too",
        "little",
        "state",
        "good",
        "very",
        "make",
        "world",
        "still",
        "own",
        "see",
        "men",
        "work",
        "long",
        "get",
        "here",
        "between",
        "both",
        "life",
        "being",
        "under",
        "never",
        "day",
        "same",
        "another",
        "know",
        "while",
        "last",
        "might",
        "us",
        "great",
        "old",
        "year",
        "off",
        "come",
        "since",
        "against",
        "go",
        "came",
        "right",
        "used",
        "take",
        "three",
        "prefill",
        "decode",
        "cache",
        "token",
        "model",
        "server",
        "route",
        "block",
    ][1:]
)
DEFAULT_VOCAB_SIZE = 32000

_PIECE_RE = re.compile(r"\w+|\s+|[^\w\s]", re.UNICODE)


class Tokenizer:
    """Stable text -> token ids. Invariant: ``encode`` is a pure function of its inputs."""

    def __init__(self, vocab_size: int = DEFAULT_VOCAB_SIZE) -> None:
        if vocab_size <= FIRST_PIECE_ID + 1:
            raise ValueError(f"vocab_size must exceed {FIRST_PIECE_ID + 1}")
        self.vocab_size = vocab_size
        self._span = vocab_size - FIRST_PIECE_ID
        self._cache: dict[str, int] = {}
        self._space = self._piece_id(" ")
        words: list[int] = []
        self._rev: dict[int, str] = {self._space: " "}
        for w in OUTPUT_WORDS:
            tid = self._piece_id(w)
            if tid not in self._rev:  # skip hash collisions: ids must detokenize uniquely
                self._rev[tid] = w
                words.append(tid)
        self._words = words

    def _piece_id(self, piece: str) -> int:
        tid = self._cache.get(piece)
        if tid is None:
            digest = hashlib.blake2b(piece.encode("utf-8"), digest_size=8).digest()
            tid = FIRST_PIECE_ID + int.from_bytes(digest, "big") % self._span
            if len(self._cache) < 200_000:  # bounded memo
                self._cache[piece] = tid
        return tid

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        pieces = _PIECE_RE.findall(text)
        ids: list[int] = list(map(self._cache.get, pieces))  # type: ignore[arg-type]
        if None in ids:  # cache misses (new pieces): hash them
            piece_id = self._piece_id
            ids = [piece_id(p) if t is None else t for p, t in zip(pieces, ids, strict=True)]
        if add_special_tokens:
            ids.insert(0, BOS_ID)
        return ids

    def token_str(self, tid: int) -> str:
        """Text of a generated (or special) token; other ids render as ``<tN>``."""
        s = self._rev.get(tid)
        if s is not None:
            return s
        if tid == BOS_ID:
            return "<s>"
        if tid == EOS_ID:
            return "</s>"
        return f"<t{tid}>"

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.token_str(t) for t in ids if t not in (BOS_ID, EOS_ID))

    def output_token(self, seed: int, position: int) -> int:
        """The ``position``-th generated token of a request whose content seed is ``seed``.

        Even positions are words, odd ones a space: the text re-tokenizes to these ids.
        """
        if position % 2:
            return self._space
        x = (seed * 6364136223846793005 + position * 1442695040888963407) & ((1 << 64) - 1)
        x ^= x >> 29
        return self._words[x % len(self._words)]

    def is_output_token(self, tid: int) -> bool:
        return tid in self._rev


def _content_text(content: Any) -> str:
    """OpenAI message content: a string or a list of parts (text parts are used)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        out = []
        for part in content:
            if isinstance(part, dict) and part.get("type") in ("text", "input_text"):
                out.append(str(part.get("text", "")))
            elif isinstance(part, str):
                out.append(part)
        return "".join(out)
    raise ValueError("message content must be a string or a list of content parts")


def render_chat(messages: Sequence[Any], add_generation_prompt: bool = True) -> str:
    """Deterministic chat template (ChatML-like). Raises ``ValueError`` on bad shapes."""
    parts: list[str] = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise ValueError(f"messages[{i}] must be an object")
        role = msg.get("role")
        if not isinstance(role, str) or not role:
            raise ValueError(f"messages[{i}].role must be a non-empty string")
        parts.append(f"<|im_start|>{role}\n{_content_text(msg.get('content'))}<|im_end|>\n")
    if add_generation_prompt:
        parts.append("<|im_start|>assistant\n")
    return "".join(parts)
