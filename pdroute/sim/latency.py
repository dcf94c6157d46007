"""Latency model: how long one engine step takes.

The engine advances in steps like vLLM's scheduler: every step decodes one token
for each running request and prefills the requests admitted in that step. A step
lasts ``itl(batch) + sum(prefill(uncached_i))``:

- ``prefill(n) = prefill_overhead + n * prefill_per_token`` (only uncached tokens
  cost compute; prefix-cache hits and KV pulled from a prefill server are free);
- ``itl(batch) = itl_base * (1 + (load_factor - 1) * (batch - 1) / (max_num_seqs - 1))``:
  the inter-token latency grows linearly with the running batch and reaches
  ``load_factor * itl_base`` at ``max_num_seqs`` (the llm-d simulator's
  ``time-factor-under-load`` convention);
- KV transfer (P/D): ``transfer_overhead + tokens * kv_bytes_per_token / bandwidth``;
- every term gets seeded Gaussian jitter (``jitter`` = relative std-dev), clamped to
  [0.3, 1.7] x mean.

Profiles name real GPU/model pairs. Their numbers come from public sources, cited
next to each profile; treat them as order-of-magnitude, not as measurements.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace


@dataclass(frozen=True, slots=True)
class LatencyProfile:
    name: str
    prefill_overhead_s: float
    prefill_per_token_s: float
    itl_s: float
    load_factor: float
    jitter: float
    #: KV bytes per token of the *real* model (time charged for a P/D transfer).
    kv_bytes_per_token: int
    transfer_overhead_s: float
    transfer_bandwidth_bps: float
    #: Typical max-num-seqs the load factor was calibrated against.
    max_num_seqs: int = 256

    def with_(self, **changes: float | int | str) -> LatencyProfile:
        return replace(self, **changes)  # type: ignore[arg-type]


# Sources:
# [SIM] llm-d-inference-sim docs/latency-profiles.md ("Latency Reference Tables and
#       Profiles": per-token calculator rows and the suggested 8B/H100 and 70B/H100-TP8
#       profiles, compiled from vLLM blog posts, MLPerf Inference and NVIDIA blogs).
# [LLMD] llm-d guides/optimized-baseline/benchmark-results/vllm-qwen3-32b-h100 (8 x TP2
#       H100, Qwen3-32B): NTPOT p50 43.9 ms at rate 60 under load.
# KV bytes/token = 2 * layers * kv_heads * head_dim * 2 bytes (FP16), per model config:
#   Llama-3.1-8B 32x8x128 -> 131072; Llama-3.1-70B 80x8x128 -> 327680;
#   Qwen3-32B 64 layers x 8 kv heads x 128 -> 262144.
PROFILES: dict[str, LatencyProfile] = {
    # [SIM] profile 1 "8B-class model on H100, balanced": prefill-overhead 30 ms,
    # prefill-time-per-token 250 us, ITL 12 ms (std 2 ms), time-factor-under-load 2.0;
    # KV transfer 3 us/token (~40 GB/s IB NDR) and 2 ms RDMA setup.
    "llama-3.1-8b-h100": LatencyProfile(
        name="llama-3.1-8b-h100",
        prefill_overhead_s=0.030,
        prefill_per_token_s=0.000250,
        itl_s=0.012,
        load_factor=2.0,
        jitter=0.15,
        kv_bytes_per_token=131072,
        transfer_overhead_s=0.002,
        transfer_bandwidth_bps=40e9,
    ),
    # [SIM] profile 2 "70B on 8xH100 (TP=8), throughput": prefill-overhead 80 ms,
    # 500 us/token, ITL 25 ms (std 4 ms), time-factor-under-load 3.0, 8 us/token KV.
    "llama-3.1-70b-h100-tp8": LatencyProfile(
        name="llama-3.1-70b-h100-tp8",
        prefill_overhead_s=0.080,
        prefill_per_token_s=0.000500,
        itl_s=0.025,
        load_factor=3.0,
        jitter=0.15,
        kv_bytes_per_token=327680,
        transfer_overhead_s=0.002,
        transfer_bandwidth_bps=40e9,
    ),
    # [SIM] table row "30-34B (TP=2)" on H100: overhead 50-80 ms, 0.30-0.50 ms/token,
    # ITL 20-30 ms at batch 1; [LLMD] NTPOT p50 ~44 ms under load -> factor ~2.
    "qwen3-32b-h100-tp2": LatencyProfile(
        name="qwen3-32b-h100-tp2",
        prefill_overhead_s=0.065,
        prefill_per_token_s=0.000400,
        itl_s=0.022,
        load_factor=2.0,
        jitter=0.12,
        kv_bytes_per_token=262144,
        transfer_overhead_s=0.002,
        transfer_bandwidth_bps=40e9,
    ),
    # For tests and throughput runs: milliseconds, no jitter.
    "fast": LatencyProfile(
        name="fast",
        prefill_overhead_s=0.001,
        prefill_per_token_s=0.000001,
        itl_s=0.001,
        load_factor=1.0,
        jitter=0.0,
        kv_bytes_per_token=1024,
        transfer_overhead_s=0.0005,
        transfer_bandwidth_bps=10e9,
    ),
    # No simulated time at all (unit tests of the HTTP surface).
    "instant": LatencyProfile(
        name="instant",
        prefill_overhead_s=0.0,
        prefill_per_token_s=0.0,
        itl_s=0.0,
        load_factor=1.0,
        jitter=0.0,
        kv_bytes_per_token=0,
        transfer_overhead_s=0.0,
        transfer_bandwidth_bps=1e12,
    ),
}


def get_profile(name: str) -> LatencyProfile:
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown latency profile {name!r}; known: {sorted(PROFILES)}") from None


class LatencyModel:
    """Step and transfer durations for one server. Invariant: same seed -> same durations."""

    def __init__(self, profile: LatencyProfile, max_num_seqs: int, seed: int = 0) -> None:
        self.profile = profile
        self.max_num_seqs = max(1, max_num_seqs)
        self._rng = random.Random(seed)
        #: Mean ITL by batch size (0..max_num_seqs), precomputed: one lookup per step.
        self._itl_mean = [
            profile.itl_s * self.load_multiplier(b) for b in range(self.max_num_seqs + 1)
        ]

    def _jitter(self, mean: float) -> float:
        j = self.profile.jitter
        if j <= 0.0 or mean <= 0.0:
            return mean
        v = self._rng.gauss(mean, mean * j)
        return min(max(v, 0.3 * mean), 1.7 * mean)

    def load_multiplier(self, batch: int) -> float:
        f = self.profile.load_factor
        if self.max_num_seqs <= 1 or batch <= 1 or f <= 1.0:
            return 1.0
        frac = min(1.0, (batch - 1) / (self.max_num_seqs - 1))
        return 1.0 + (f - 1.0) * frac

    def itl(self, batch: int) -> float:
        if batch <= self.max_num_seqs:
            mean = self._itl_mean[batch]
            return self._jitter(mean) if self.profile.jitter > 0.0 else mean
        return self._jitter(self.profile.itl_s * self.load_multiplier(batch))

    def prefill(self, uncached_tokens: int, batch: int = 1) -> float:
        p = self.profile
        mean = (p.prefill_overhead_s + uncached_tokens * p.prefill_per_token_s) * (
            self.load_multiplier(batch)
        )
        return self._jitter(mean)

    def step(self, batch: int, prefill_tokens: list[int]) -> float:
        """Duration of one engine step: decode ``batch`` sequences and prefill new ones."""
        t = self.itl(batch) if batch else 0.0
        for n in prefill_tokens:
            t += self.prefill(n, batch)
        return t

    def transfer(self, tokens: int) -> float:
        p = self.profile
        return self._jitter(
            p.transfer_overhead_s + tokens * p.kv_bytes_per_token / p.transfer_bandwidth_bps
        )
