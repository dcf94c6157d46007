"""Latency model: formulas, load scaling, seeded jitter, profiles."""

from __future__ import annotations

import pytest

from pdroute.sim.latency import PROFILES, LatencyModel, get_profile


def test_prefill_is_overhead_plus_per_token() -> None:
    p = get_profile("llama-3.1-8b-h100").with_(jitter=0.0)
    m = LatencyModel(p, max_num_seqs=64)
    assert m.prefill(256) == pytest.approx(0.030 + 256 * 0.000250)
    assert m.prefill(0) == pytest.approx(0.030)


def test_itl_grows_linearly_with_batch_to_load_factor() -> None:
    p = get_profile("llama-3.1-70b-h100-tp8").with_(jitter=0.0)
    m = LatencyModel(p, max_num_seqs=11)
    assert m.itl(1) == pytest.approx(0.025)
    assert m.itl(6) == pytest.approx(0.025 * 2.0)  # halfway to factor 3
    assert m.itl(11) == pytest.approx(0.025 * 3.0)
    assert m.itl(50) == pytest.approx(0.025 * 3.0)


def test_step_sums_decode_and_prefills() -> None:
    p = get_profile("llama-3.1-8b-h100").with_(jitter=0.0, load_factor=1.0)
    m = LatencyModel(p, max_num_seqs=8)
    assert m.step(3, [100, 0]) == pytest.approx(0.012 + 0.030 + 0.025 + 0.030)
    assert m.step(0, []) == 0.0


def test_jitter_is_seeded_and_clamped() -> None:
    p = get_profile("llama-3.1-8b-h100").with_(jitter=5.0)
    a = [LatencyModel(p, 8, seed=3).itl(1) for _ in range(3)]
    m1, m2 = LatencyModel(p, 8, seed=3), LatencyModel(p, 8, seed=3)
    s1 = [m1.itl(1) for _ in range(200)]
    assert s1 == [m2.itl(1) for _ in range(200)]
    assert a[0] == s1[0]
    assert all(0.3 * 0.012 - 1e-12 <= v <= 1.7 * 0.012 + 1e-12 for v in s1)
    assert len(set(s1)) > 10


def test_transfer_time_uses_real_kv_size() -> None:
    p = get_profile("llama-3.1-8b-h100").with_(jitter=0.0)
    m = LatencyModel(p, 8)
    assert m.transfer(1000) == pytest.approx(0.002 + 1000 * 131072 / 40e9)


def test_profiles_known_and_unknown() -> None:
    assert {"fast", "llama-3.1-8b-h100", "llama-3.1-70b-h100-tp8", "qwen3-32b-h100-tp2"} <= set(
        PROFILES
    )
    with pytest.raises(ValueError, match="unknown latency profile"):
        get_profile("nope")


def test_itl_table_matches_the_formula_for_every_batch() -> None:
    p = get_profile("llama-3.1-70b-h100-tp8").with_(jitter=0.0)
    m = LatencyModel(p, 16)
    for b in range(0, 20):
        assert m.itl(b) == p.itl_s * m.load_multiplier(b)
