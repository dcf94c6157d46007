"""A selective parser for the Prometheus text exposition format (version 0.0.4).

A vLLM ``/metrics`` page is ~55 KB and ~700 lines, of which the EPP needs five or
six series. Parsing every line with a general parser (``prometheus_client.parser``)
costs milliseconds per scrape; at a 100 ms cadence and 100 endpoints that is a core.

:func:`parse_selected` instead searches the text for ``"\\n" + name`` for each
wanted metric name (``str.find`` runs in C) and fully parses only the lines it
finds: the name must be followed by ``{`` or whitespace (so ``vllm:num_requests_waiting``
does not match ``vllm:num_requests_waiting_by_reason``), label values are unescaped
exactly like ``prometheus_client`` does (``\\\\``, ``\\"``, ``\\n``; other escapes
kept verbatim), commas and braces inside quoted values are handled, and an
optional timestamp after the value is ignored. A raw newline cannot occur inside a
sample line (the format escapes it), so a line-start search cannot be fooled by
label content. Comment (``#``) and blank lines never match a metric name.

Tests check that the result equals ``prometheus_client``'s parser on the real vLLM
captures and on hand-written edge cases. A malformed wanted line raises
:class:`MetricsParseError`; lines of other metrics are not looked at at all.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from functools import lru_cache

#: Distinct sample lines remembered (bounded: lines are short, ~2 KB at most in vLLM).
LINE_CACHE_SIZE = 4096

#: labels, value (treat the dict as read-only)
Sample = tuple[dict[str, str], float]

_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*\Z")
_ESCAPE = re.compile(r"\\[\\n\"]")
_ESCAPES = {"\\\\": "\\", "\\n": "\n", '\\"': '"'}
_LN = r"[a-zA-Z_][a-zA-Z0-9_]*"
_PAIR_RX = r"[ \t]*(" + _LN + r')[ \t]*=[ \t]*"([^"\\]*)"[ \t]*'
#: Fast path for a sample line without backslashes: labels, value, timestamp.
_PAIR_NC = _PAIR_RX.replace("(", "(?:")
_FAST_REST = re.compile(
    r"(?:[ \t]*\{((?:"
    + _PAIR_NC
    + r",)*(?:"
    + _PAIR_NC
    + r")?)\})?[ \t]+([^ \t]+)(?:[ \t]+([^ \t]+))?[ \t]*\Z"
)
_PAIR = re.compile(_PAIR_RX)
_AFTER_NAME = frozenset("{ \t\r\n")


class MetricsParseError(ValueError):
    """A wanted sample line is not valid Prometheus text format."""


def _unescape(raw: str) -> str:
    return _ESCAPE.sub(lambda m: _ESCAPES[m.group(0)], raw)


def _parse_value(text: str, line: str) -> float:
    parts = text.split()
    if not parts or len(parts) > 2:
        raise MetricsParseError(f"expected 'value [timestamp]' in line {line[:200]!r}")
    v = parts[0]
    if "_" in v:
        raise MetricsParseError(f"bad value {v!r} in line {line[:200]!r}")
    try:
        value = float(v)
    except ValueError:
        raise MetricsParseError(f"bad value {v!r} in line {line[:200]!r}") from None
    if len(parts) == 2:
        try:
            int(parts[1])
        except ValueError:
            raise MetricsParseError(f"bad timestamp {parts[1]!r} in line {line[:200]!r}") from None
    return value


def _parse_labels(line: str, pos: int) -> tuple[dict[str, str], int]:
    """Parse ``{...}`` starting at ``line[pos] == '{'``; return labels and the index
    just after ``}``."""
    labels: dict[str, str] = {}
    n = len(line)
    pos += 1
    while True:
        while pos < n and line[pos] in " \t":
            pos += 1
        if pos >= n:
            raise MetricsParseError(f"unterminated label set in line {line[:200]!r}")
        if line[pos] == "}":
            return labels, pos + 1
        eq = line.find("=", pos)
        if eq < 0:
            raise MetricsParseError(f"label without '=' in line {line[:200]!r}")
        name = line[pos:eq].strip()
        if not _LABEL_NAME.match(name):
            raise MetricsParseError(f"bad label name {name!r} in line {line[:200]!r}")
        pos = eq + 1
        while pos < n and line[pos] in " \t":
            pos += 1
        if pos >= n or line[pos] != '"':
            raise MetricsParseError(f"label value not quoted in line {line[:200]!r}")
        start = pos + 1
        end = line.find('"', start)
        while end > 0:
            # The quote is escaped when preceded by an odd number of backslashes.
            bs = 0
            k = end - 1
            while k >= start and line[k] == "\\":
                bs += 1
                k -= 1
            if bs % 2 == 0:
                break
            end = line.find('"', end + 1)
        if end < 0:
            raise MetricsParseError(f"unterminated label value in line {line[:200]!r}")
        raw = line[start:end]
        labels[name] = _unescape(raw) if "\\" in raw else raw
        pos = end + 1
        while pos < n and line[pos] in " \t":
            pos += 1
        if pos < n and line[pos] == ",":
            pos += 1
        elif pos < n and line[pos] == "}":
            return labels, pos + 1
        else:
            raise MetricsParseError(f"expected ',' or '}}' in line {line[:200]!r}")


def parse_line_rest(line: str, pos: int) -> Sample:
    """Parse a sample line from just after the metric name."""
    while pos < len(line) and line[pos] in " \t":
        pos += 1
    if pos < len(line) and line[pos] == "{":
        labels, pos = _parse_labels(line, pos)
    else:
        labels = {}
    return labels, _parse_value(line[pos:], line)


@lru_cache(maxsize=LINE_CACHE_SIZE)
def _parse_rest(name: str, rest: str) -> Sample:
    """Parse one wanted line (after its name). Memoized: most scraped lines repeat
    verbatim between scrapes (info series, idle gauges), and the label-heavy
    ``cache_config_info`` line is the costliest to parse. Cached samples are shared,
    so callers must not mutate the label dicts."""
    if rest.endswith("\r"):
        rest = rest[:-1]
    fast = _FAST_REST.match(rest)
    if fast is not None:
        body = fast.group(1)
        labels = dict(_PAIR.findall(body)) if body else {}
        ts = fast.group(3)
        return labels, _parse_value(fast.group(2) if ts is None else f"{fast.group(2)} {ts}", rest)
    if not rest.strip():
        raise MetricsParseError(f"sample {name!r} has no value")
    return parse_line_rest(name + rest, len(name))


def parse_selected(text: str, names: Iterable[str]) -> dict[str, list[Sample]]:
    """Samples of the metrics in ``names`` (exact sample names), in text order.

    Names absent from the text are absent from the result. The format requires all
    lines of one metric family to form a single block, so once a name was found the
    search stops at the next ``# TYPE`` line instead of scanning the rest of the page.
    """
    buf = "\n" + text
    size = len(buf)
    out: dict[str, list[Sample]] = {}
    for name in names:
        needle = "\n" + name
        skip = len(needle)
        i = buf.find(needle)
        found: list[Sample] = []
        while i >= 0:
            j = i + skip
            c = buf[j] if j < size else "\n"
            if c in _AFTER_NAME:
                end = buf.find("\n", j)
                if end < 0:
                    end = size
                found.append(_parse_rest(name, buf[j:end]))
                if buf.startswith(needle, end):
                    i = end  # the next line continues the group
                else:
                    # A family's lines are one block (histogram/counter sample names
                    # interleave per label set inside it): search on only up to the
                    # next family's TYPE line.
                    stop = buf.find("\n# TYPE ", end)
                    i = buf.find(needle, end, size if stop < 0 else stop)
            else:
                i = buf.find(needle, j)  # a longer name sharing the prefix
        if found:
            out[name] = found
    return out
