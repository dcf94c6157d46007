"""The bench's digest of the EPP's Prometheus histograms (routing-side diagnosis)."""

from __future__ import annotations

import pytest

from pdroute.bench.runner import EPP_HISTOGRAMS, histogram_means

TEXT = """\
# HELP llm_d_epp_prefix_indexer_hit_ratio Fraction of a request's prefix blocks found.
# TYPE llm_d_epp_prefix_indexer_hit_ratio histogram
llm_d_epp_prefix_indexer_hit_ratio_bucket{index="approx",le="0.5"} 1.0
llm_d_epp_prefix_indexer_hit_ratio_sum{index="approx"} 3.0
llm_d_epp_prefix_indexer_hit_ratio_count{index="approx"} 4.0
llm_d_epp_plugin_duration_seconds_sum{extension_point="PrepareData",plugin_name="p",\
plugin_type="precise-prefix-cache-producer"} 1.5
llm_d_epp_plugin_duration_seconds_count{extension_point="PrepareData",plugin_name="p",\
plugin_type="precise-prefix-cache-producer"} 3.0
llm_d_epp_plugin_duration_seconds_count{extension_point="Scorer",plugin_name="q",\
plugin_type="queue-scorer"} 0.0
llm_d_epp_plugin_duration_seconds_sum{extension_point="Scorer",plugin_name="q",\
plugin_type="queue-scorer"} 0.0
other_metric_sum 7
"""


def test_histogram_means_by_label_values() -> None:
    got = histogram_means(TEXT, EPP_HISTOGRAMS)
    assert got["llm_d_epp_prefix_indexer_hit_ratio"] == {"approx": {"count": 4.0, "mean": 0.75}}
    durations = got["llm_d_epp_plugin_duration_seconds"]
    assert durations["PrepareData/precise-prefix-cache-producer"] == {
        "count": 3.0,
        "mean": pytest.approx(0.5),
    }
    # An empty series has mean 0, not a division error.
    assert durations["Scorer/queue-scorer"] == {"count": 0.0, "mean": 0.0}
    assert "other_metric" not in got
