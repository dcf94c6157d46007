"""Report rendering from a fixture results JSON (tables, ratios, losses, failures)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import orjson
import pytest

from pdroute.bench import cmd
from pdroute.bench.report import comparisons, losses, render_markdown

FIXTURE = Path(__file__).parent / "fixtures" / "results-small.json"


@pytest.fixture
def results() -> dict[str, Any]:
    data: dict[str, Any] = orjson.loads(FIXTURE.read_bytes())
    return data


def test_table_rows_and_numbers(results: dict[str, Any]) -> None:
    md = render_markdown(results)
    assert md.startswith("# pdroute benchmarks\n")
    # TTFT p50/p90/p99 in ms, ITL, tokens/s, goodput, hit rate, CV, router CPU.
    assert "| pdroute | 60 / 100 / 300 | 14 / 25 | 1.00 / 2.00 | 800 | 10.00 (95.0%) | 0 " in md
    assert "| 85.0% | 0.30 | 12.0 |" in md
    assert "| round-robin | 900 / 2000 / 4000 |" in md
    assert "working set: 16 prefixes x 1536 tokens = 24576 tokens = 2.4x one endpoint's KV" in md
    assert "Quick mode" in md


def test_failed_arm_is_listed_with_reason_not_dropped(results: dict[str, Any]) -> None:
    md = render_markdown(results)
    assert "| sglang-router | **failed**: installing sglang-router==0.3.2 failed" in md
    assert "## Arms that failed" in md
    assert "- shared-prefix / sglang-router: installing sglang-router" in md
    assert "## Not measured yet" in md and "pdroute-precise" in md


def test_ratios_against_baseline_and_peers(results: dict[str, Any]) -> None:
    lines = comparisons(results["workloads"]["shared-prefix"]["arms"])
    assert (
        "- **pdroute vs round-robin**: TTFT p90 20.00x lower, output tokens/s 2.00x, "
        "goodput 3.33x" in lines
    )
    assert any(line.startswith("- **pdroute vs vllm-router**: TTFT p90 4.00x") for line in lines)
    assert not any("sglang-router" in line for line in lines)  # failed arm: no ratio


def test_losses_name_every_metric_where_pdroute_is_beaten(results: dict[str, Any]) -> None:
    lost = "\n".join(losses(results["workloads"]["shared-prefix"]["arms"]))
    assert "router CPU seconds: pdroute 12.0 s; better: round-robin (1.0 s), vllm-router" in lost
    assert "balance CV: pdroute 0.30; better: round-robin (0.01), vllm-router (0.20)" in lost
    assert "ITL p90: pdroute 25 ms; better: vllm-router (22 ms)" in lost
    assert "TTFT p90" not in lost  # pdroute wins there
    assert "Why:" in lost


def test_ramp_table(results: dict[str, Any]) -> None:
    md = render_markdown(results)
    assert "| round-robin | 8 | 3.3 | 3000 | 20 | 2.00 | 0.0% |" in md
    assert "| pdroute | 4 | 3.3 | 80 |" in md


def test_report_command_missing_results(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = cmd.run(argparse.Namespace(bench_cmd="report", results=tmp_path, docs=tmp_path / "x.md"))
    assert rc == 2
    assert "results.json" in capsys.readouterr().err


def test_headline_states_targets_met_or_not(results: dict[str, Any]) -> None:
    from pdroute.bench.report import headline

    lines = headline(results)
    assert "= **20.0x** better (target >= 5x: met)" in lines[0]
    assert "output tokens/s vs round robin: **2.00x** (target >= 1.5x: met)" in lines[1]
    assert (
        "vs vllm-router (cache_aware): 100 ms vs 400 ms = **4.00x** (target: better: met)"
        in (lines[2])
    )
    assert lines[3].startswith("- vs sglang-router (cache_aware): no result (installing")
    assert lines[4] == "- errors/rejections: none in any arm (no arm wins by rejecting)"
    # A slower pdroute is reported as such, not hidden.
    arms = results["workloads"]["shared-prefix"]["arms"]
    arms["pdroute"]["summary"]["ttft_s"]["p90"] = 0.8
    lines = headline(results)
    assert "(target >= 5x: NOT met)" in lines[0]
    assert "(target: better: NOT met)" in lines[2]
    assert "## Headline" in render_markdown(results)


def test_repeats_are_listed(results: dict[str, Any]) -> None:
    arms = results["workloads"]["shared-prefix"]["arms"]
    arms["pdroute"]["repeats"] = [
        {"status": "ok", "ttft_p90_s": 0.1, "output_tokens_per_s": 800.0},
        {"status": "failed", "reason": "x"},
    ]
    md = render_markdown(results)
    assert "- pdroute, every run (TTFT p90 / output tok/s): 100 ms / 800 tok/s, failed" in md


def test_merge_results_later_workload_wins_and_runs_are_kept(results: dict[str, Any]) -> None:
    import copy

    later = copy.deepcopy(results)
    later["created"] = "2026-11-25T13:00:00+00:00"
    later["config"]["argv"] = ["pdroute", "bench", "run", "--repeat", "3"]
    del later["workloads"]["ramp"]
    later["workloads"]["shared-prefix"]["arms"]["pdroute"]["summary"]["ttft_s"]["p90"] = 0.2
    merged = cmd.merge_results([results, later])
    assert list(merged["workloads"]) == ["shared-prefix", "ramp"]
    assert (
        merged["workloads"]["shared-prefix"]["arms"]["pdroute"]["summary"]["ttft_s"]["p90"] == 0.2
    )
    assert [r["created"] for r in merged["runs"]] == [results["created"], later["created"]]
    md = render_markdown(merged)
    assert "command `pdroute bench run --quick`" in md
    assert "command `pdroute bench run --repeat 3`" in md


def test_merged_runs_keep_their_commit_and_load(results: dict[str, Any]) -> None:
    import copy

    later = copy.deepcopy(results)
    later["created"] = "later"
    later["environment"] = {**results["environment"], "git_commit": "abc1234", "cpus": 16}
    later["environment"]["load_average_at_start"] = [3.21, 2.0, 1.0]
    merged = cmd.merge_results([results, later])
    assert merged["environment"]["cpus"] == 16  # the machine line: the newest run
    md = render_markdown(merged)
    assert "(commit abc1234, load average at start 3.2 / 2.0 / 1.0)" in md


def test_merge_same_spec_merges_arms(results: dict[str, Any]) -> None:
    import copy

    rerun = copy.deepcopy(results)
    rerun["created"] = "later"
    wl = rerun["workloads"]["shared-prefix"]
    wl["arms"] = {"sglang-router": copy.deepcopy(wl["arms"]["vllm-router"])}
    merged = cmd.merge_results([results, rerun])
    arms = merged["workloads"]["shared-prefix"]["arms"]
    assert list(arms) == ["pdroute", "round-robin", "vllm-router", "sglang-router"]
    assert arms["sglang-router"]["status"] == "ok"  # the rerun replaced the failure


def test_notes_follow_the_headline(results: dict[str, Any]) -> None:
    md = render_markdown(results, notes="## What this shows\n\nAffinity wins.\n")
    assert md.index("## Headline") < md.index("## What this shows") < md.index("## Shared")


def test_loss_on_ttft_names_the_busier_endpoint_when_hit_rates_match(
    results: dict[str, Any],
) -> None:
    arms = results["workloads"]["shared-prefix"]["arms"]
    ours, peer = arms["pdroute"], arms["vllm-router"]
    ours["summary"]["ttft_s"]["p90"] = 0.5
    peer["summary"]["ttft_s"]["p90"] = 0.2
    peer["prefix_cache"]["hit_rate"] = ours["prefix_cache"]["hit_rate"]
    ours["summary"]["per_endpoint"] = {"a": 300.0, "b": 100.0}
    peer["summary"]["per_endpoint"] = {"a": 250.0, "b": 150.0}
    (line,) = [x for x in losses(arms) if x.startswith("- TTFT p90")]
    assert "its busiest endpoint served fewer requests (250 vs 300)" in line
    # Equal busiest endpoints: the next check (balance CV) speaks instead.
    peer["summary"]["per_endpoint"] = {"a": 300.0, "b": 100.0}
    (line,) = [x for x in losses(arms) if x.startswith("- TTFT p90")]
    assert "busiest" not in line and "spreads requests more evenly" in line


def test_quick_banner_only_when_every_run_was_quick(results: dict[str, Any]) -> None:
    import copy

    assert "> Quick mode:" in render_markdown(results)
    later = copy.deepcopy(results)
    later["created"] = "later"
    later["config"]["argv"] = ["pdroute", "bench", "run", "--workload", "shared-prefix"]
    later["config"]["quick"] = False
    md = render_markdown(cmd.merge_results([results, later]))
    assert "> Quick mode:" not in md
    assert "> Some tables come from quick runs" in md
