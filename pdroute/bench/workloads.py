"""Seeded, offline workload generators for ``pdroute bench``.

A workload is a list of :class:`BenchRequest` (arrival offset, prompt, output
length, labels) plus the fleet it should run against (:class:`FleetSpec`). Every
generator is a pure function of its :class:`WorkloadSpec` (seed included): the same
spec gives byte-identical requests in every process, so every arm of one run sees
exactly the same traffic, and two runs with the same seed are comparable.

Prompt text is made of words drawn from a fixed vocabulary separated by single
spaces. The simulator's tokenizer (:mod:`pdroute.sim.tokenizer`) turns each word
and each run of spaces into one token, so ``n`` tokens of text are ``n // 2`` words;
:func:`text_tokens` counts with that tokenizer, and the unit tests check that the
prompts have the token lengths the spec asks for. Shared prefixes are
byte-identical, so they give identical token prefixes and identical vLLM block
hashes on every engine, and identical character prefixes for the character-tree
routers (vllm-router, sglang-router).

Arrivals are open-loop Poisson (exponential gaps at the offered rate): the client
sends at the planned time whether or not earlier requests finished, so an
overloaded arm shows queueing instead of silently offering less load.

Workloads:

``shared-prefix``
    ``groups`` system prompts of ``system_tokens`` each; every request is one group's
    system prompt plus a unique question. The headline case sizes the working set
    (``groups * system_tokens`` tokens) above one endpoint's KV capacity, so only a
    router that keeps each group on few endpoints gets cache hits. Group popularity
    is Zipf-skewed (``group_skew`` 1.0: a few system prompts dominate, as in real
    traffic) and outputs are long enough that a hot group's endpoint runs out of KV
    for running requests: affinity alone then queues, load awareness does not.
``shared-prefix-uniform``
    The same with uniform popularity and short outputs: pure affinity's best case.
``multi-turn``
    Chat sessions whose prompt is the whole history so far (system prompt, earlier
    user turns and synthetic assistant replies); turn ``k`` of a session arrives
    ``think_s`` after turn ``k-1``'s planned arrival (open loop).
``pd``
    Long unique prompts, short outputs: prefill-dominated, the case for P/D.
``short``
    Short prompts and outputs at a high rate: router overhead and balance.
``ramp``
    The shared-prefix mix at increasing rates (``ramp_rates``), ``duration_s /
    len(ramp_rates)`` seconds each: latency vs offered load up to saturation.
"""

from __future__ import annotations

import functools
import math
import random
from dataclasses import asdict, dataclass, field, replace
from typing import Any

WORKLOADS = ("shared-prefix", "shared-prefix-uniform", "multi-turn", "pd", "short", "ramp")

# A fixed vocabulary: common English words, so peers' character trees see text of
# realistic shape. Order matters (seeded draws index into it).
_VOCAB_TEXT = (
    "system user assistant model answer question context document policy account "
    "customer order invoice product service network server cluster request response "
    "token cache memory latency throughput queue batch prefix decode prefill routing "
    "gateway endpoint metric window budget schedule report summary detail example "
    "please explain describe compare list write review check update create delete "
    "quickly carefully clearly briefly fully again always never often sometimes "
    "red green blue yellow black white small large short long early late first last "
    "river mountain forest city village ocean desert island valley bridge road train "
    "apple bread cheese coffee water music paper garden window kitchen table chair "
    "alpha beta gamma delta epsilon zeta theta kappa lambda sigma omega number value"
)
_VOCAB: tuple[str, ...] = tuple(_VOCAB_TEXT.split(" "))


class WorkloadError(ValueError):
    """A workload parameter that cannot work (the message names it)."""


@dataclass(frozen=True, slots=True)
class BenchRequest:
    """One planned request. ``at_s`` is the offset from the start of the run."""

    idx: int
    at_s: float
    prompt: str
    max_tokens: int
    #: What the request belongs to: shared-prefix group, session, "unique".
    group: str
    #: Ramp step (0 for single-rate workloads) and its offered rate (req/s).
    phase: int = 0
    rate: float = 0.0
    session: str | None = None
    turn: int = 0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_json(d: dict[str, Any]) -> BenchRequest:
        return BenchRequest(**d)


@dataclass(frozen=True, slots=True)
class FleetSpec:
    """The simulated fleet every arm of a workload runs against."""

    decode: int = 4
    #: Prefill servers for the P/D arm; taken out of ``decode`` (same server count).
    prefill: int = 0
    profile: str = "llama-3.1-8b-h100"
    block_size: int = 16
    #: KV capacity of ONE endpoint, in blocks.
    num_blocks: int = 640
    max_num_seqs: int = 64
    max_model_len: int = 32768

    @property
    def kv_tokens(self) -> int:
        return self.block_size * self.num_blocks


@dataclass(frozen=True, slots=True)
class WorkloadSpec:
    name: str
    seed: int = 0
    rate: float = 12.0
    duration_s: float = 40.0
    groups: int = 16
    #: Zipf exponent of group popularity (0 = uniform; 1 = the hottest group gets
    #: ~30% of 16 groups' traffic, like a few dominant system prompts).
    group_skew: float = 0.0
    system_tokens: int = 1536
    question_tokens: int = 64
    output_tokens: int = 64
    #: multi-turn
    sessions_turns: int = 5
    turn_tokens: int = 96
    think_s: float = 4.0
    #: ramp
    ramp_rates: tuple[float, ...] = (4.0, 8.0, 12.0, 16.0, 20.0)
    fleet: FleetSpec = field(default_factory=FleetSpec)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["ramp_rates"] = list(self.ramp_rates)
        return d

    def validate(self) -> None:
        if self.name not in WORKLOADS:
            raise WorkloadError(f"workload: unknown {self.name!r}; known: {', '.join(WORKLOADS)}")
        for key in ("rate", "duration_s"):
            if getattr(self, key) <= 0:
                raise WorkloadError(f"{key}: must be > 0")
        if self.group_skew < 0:
            raise WorkloadError("group_skew: must be >= 0")
        for key in ("groups", "system_tokens", "question_tokens", "output_tokens"):
            if getattr(self, key) < 1:
                raise WorkloadError(f"{key}: must be >= 1")
        if self.name == "ramp" and (not self.ramp_rates or min(self.ramp_rates) <= 0):
            raise WorkloadError("ramp_rates: need at least one rate, all > 0")
        if self.fleet.decode < 1:
            raise WorkloadError("decode: need at least one decode server")


def default_spec(name: str, *, seed: int = 0, quick: bool = False) -> WorkloadSpec:
    """The suite's tuned defaults per workload (``quick`` shortens the runs).

    Headline sizing (``shared-prefix``): 16 groups x 1536-token system prompts =
    24,576 tokens of shared prefixes, against 640 blocks x 16 = 10,240 tokens of KV
    per endpoint: one endpoint holds ~40% of the working set (less the running
    requests' own blocks), four endpoints together hold all of it if each keeps
    its own quarter of the groups.
    """
    dur = 30.0 if quick else 90.0
    base = WorkloadSpec(name=name, seed=seed, duration_s=dur)
    if name == "shared-prefix":
        return replace(base, rate=10.0, group_skew=1.0, output_tokens=192)
    if name == "shared-prefix-uniform":
        return replace(base, rate=14.0)
    if name == "multi-turn":
        return replace(
            base,
            rate=6.0,
            system_tokens=256,
            sessions_turns=5,
            turn_tokens=160,
            output_tokens=64,
            think_s=3.0,
        )
    if name == "pd":
        # 4 servers; the P/D arm makes 2 of them prefill servers (prefill-heavy load).
        return replace(
            base,
            rate=2.0,
            system_tokens=3072,
            question_tokens=32,
            output_tokens=32,
            fleet=replace(base.fleet, prefill=2),
        )
    if name == "short":
        return replace(base, rate=30.0, system_tokens=48, question_tokens=16, output_tokens=32)
    if name == "ramp":
        return replace(
            base,
            group_skew=1.0,
            output_tokens=192,
            ramp_rates=(3.0, 6.0, 9.0, 12.0),
            duration_s=48.0 if quick else 160.0,
        )
    raise WorkloadError(f"workload: unknown {name!r}; known: {', '.join(WORKLOADS)}")


def words(rng: random.Random, n_tokens: int) -> str:
    """Text of about ``n_tokens`` simulator tokens (a word and a space are one each)."""
    n = max(1, (n_tokens + 1) // 2)
    return " ".join(rng.choice(_VOCAB) for _ in range(n))


def text_tokens(text: str) -> int:
    """Token count of ``text`` by the simulator's tokenizer (no special tokens)."""
    from pdroute.sim.tokenizer import Tokenizer

    return len(Tokenizer().encode(text, False))


def poisson_arrivals(rng: random.Random, rate: float, start_s: float, end_s: float) -> list[float]:
    """Open-loop arrival times in ``[start_s, end_s)`` at ``rate`` per second."""
    out: list[float] = []
    t = start_s
    while True:
        t += rng.expovariate(rate)
        if t >= end_s:
            return out
        out.append(t)


def _rng(spec: WorkloadSpec, stream: str) -> random.Random:
    # str seeds are hashed with SHA-512 by random.Random: stable across processes.
    return random.Random(f"{spec.seed}/{spec.name}/{stream}")


@functools.lru_cache(maxsize=8)
def _systems(spec: WorkloadSpec) -> tuple[str, ...]:
    return tuple(
        f"[group {g}] " + words(_rng(spec, f"system-{g}"), spec.system_tokens)
        for g in range(spec.groups)
    )


def _shared_prefix(
    spec: WorkloadSpec, rate: float, span: tuple[float, float], phase: int, first_idx: int
) -> list[BenchRequest]:
    systems = _systems(spec)
    arrivals = poisson_arrivals(_rng(spec, f"arrivals-{phase}"), rate, *span)
    pick = _rng(spec, f"pick-{phase}")
    weights = [1.0 / (g + 1) ** spec.group_skew for g in range(spec.groups)]
    out: list[BenchRequest] = []
    for i, at in enumerate(arrivals):
        g = pick.choices(range(spec.groups), weights)[0]
        q = words(pick, spec.question_tokens)
        out.append(
            BenchRequest(
                idx=first_idx + i,
                at_s=round(at, 6),
                prompt=f"{systems[g]}\nQuestion {first_idx + i}: {q}",
                max_tokens=spec.output_tokens,
                group=f"g{g}",
                phase=phase,
                rate=rate,
            )
        )
    return out


def _multi_turn(spec: WorkloadSpec) -> list[BenchRequest]:
    turns = max(1, spec.sessions_turns)
    session_rate = spec.rate / turns
    starts = poisson_arrivals(_rng(spec, "sessions"), session_rate, 0.0, spec.duration_s)
    reqs: list[tuple[float, int, int, str, str]] = []
    for s, start in enumerate(starts):
        rng = _rng(spec, f"session-{s}")
        history = f"[session {s}] " + words(rng, spec.system_tokens)
        for k in range(turns):
            history += f"\nUser: {words(rng, spec.turn_tokens)}\nAssistant:"
            reqs.append((start + k * spec.think_s, s, k, f"s{s}", history))
            # The next turn carries a synthetic reply (the simulator's text is not
            # fed back: arrivals stay open-loop and identical across arms).
            history += " " + words(rng, spec.output_tokens)
    reqs.sort(key=lambda r: (r[0], r[1], r[2]))
    return [
        BenchRequest(
            idx=i,
            at_s=round(at, 6),
            prompt=prompt,
            max_tokens=spec.output_tokens,
            group=sid,
            rate=spec.rate,
            session=sid,
            turn=k,
        )
        for i, (at, _s, k, sid, prompt) in enumerate(reqs)
    ]


def _unique(spec: WorkloadSpec) -> list[BenchRequest]:
    rng = _rng(spec, "unique")
    arrivals = poisson_arrivals(_rng(spec, "arrivals"), spec.rate, 0.0, spec.duration_s)
    return [
        BenchRequest(
            idx=i,
            at_s=round(at, 6),
            prompt=f"Request {i}: " + words(rng, spec.system_tokens + spec.question_tokens),
            max_tokens=spec.output_tokens,
            group="unique",
            rate=spec.rate,
        )
        for i, at in enumerate(arrivals)
    ]


def generate(spec: WorkloadSpec) -> list[BenchRequest]:
    """The planned requests of ``spec``, sorted by arrival (deterministic)."""
    spec.validate()
    if spec.name in ("shared-prefix", "shared-prefix-uniform"):
        return _shared_prefix(spec, spec.rate, (0.0, spec.duration_s), 0, 0)
    if spec.name == "multi-turn":
        return _multi_turn(spec)
    if spec.name in ("pd", "short"):
        return _unique(spec)
    # ramp
    step = spec.duration_s / len(spec.ramp_rates)
    out: list[BenchRequest] = []
    for phase, rate in enumerate(spec.ramp_rates):
        out += _shared_prefix(spec, rate, (phase * step, (phase + 1) * step), phase, len(out))
    return out


def working_set_tokens(spec: WorkloadSpec) -> int:
    """Distinct shared-prefix tokens the fleet would need to cache everything."""
    if spec.name in ("shared-prefix", "shared-prefix-uniform", "ramp"):
        return spec.groups * spec.system_tokens
    return 0


def describe(spec: WorkloadSpec, reqs: list[BenchRequest]) -> dict[str, Any]:
    """Shape facts for the results page (request count, token sizes, KV pressure)."""
    lens = sorted(text_tokens(r.prompt) for r in reqs[:200]) or [0]
    ws = working_set_tokens(spec)
    return {
        "requests": len(reqs),
        "prompt_tokens_p50": lens[len(lens) // 2],
        "prompt_tokens_max": lens[-1],
        "output_tokens": spec.output_tokens,
        "working_set_tokens": ws,
        "endpoint_kv_tokens": spec.fleet.kv_tokens,
        "working_set_over_endpoint_kv": round(ws / spec.fleet.kv_tokens, 2) if ws else None,
        "offered_rate": spec.rate if spec.name != "ramp" else list(spec.ramp_rates),
        "duration_s": spec.duration_s,
        "mean_gap_s": round(spec.duration_s / max(1, len(reqs)), 4) if reqs else math.nan,
    }
