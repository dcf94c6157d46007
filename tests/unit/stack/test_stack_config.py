"""The EPP config `pdroute up` generates: the EPP's built-in default, and for P/D the
same scorers in llm-d's decode/prefill layout."""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from epp.config import DEFAULT_CONFIG_PATH, load_config_text
from pdroute.stack.cmd import add_arguments, epp_config_text, make_plan


def plan_for(tmp_path: Path, *argv: str) -> object:
    p = argparse.ArgumentParser()
    add_arguments(p)
    return make_plan(p.parse_args(["--run-dir", str(tmp_path), *argv]))


def test_aggregated_stack_runs_the_epp_default(tmp_path: Path) -> None:
    text = epp_config_text(plan_for(tmp_path, "--prefill", "0"))  # type: ignore[arg-type]
    assert yaml.safe_load(text) == yaml.safe_load(DEFAULT_CONFIG_PATH.read_text())
    load_config_text(text)  # valid for the EPP


def test_pd_stack_uses_the_default_scorers_in_both_profiles(tmp_path: Path) -> None:
    plan = plan_for(tmp_path, "--prefill", "1", "--pd-threshold", "300")
    doc = yaml.safe_load(epp_config_text(plan))  # type: ignore[arg-type]
    default = yaml.safe_load(DEFAULT_CONFIG_PATH.read_text())
    scorers = [p for p in default["schedulingProfiles"][0]["plugins"] if "weight" in p]
    assert scorers  # the default has weighted scorers to carry over
    profiles = {p["name"]: p["plugins"] for p in doc["schedulingProfiles"]}
    assert set(profiles) == {"decode", "prefill"}
    for role, refs in profiles.items():
        assert refs[0] == {"pluginRef": f"{role}-filter"}
        assert [r for r in refs if "weight" in r] == scorers
    decider = next(p for p in doc["plugins"] if p["type"] == "prefix-based-pd-decider")
    assert decider["parameters"] == {"nonCachedTokens": 300}
    cfg = load_config_text(yaml.safe_dump(doc))
    assert {p.name for p in cfg.scheduling_profiles} == {"decode", "prefill"}


def test_endpoints_file_is_rewritten_for_a_new_run(tmp_path: Path) -> None:
    from pdroute.stack.cmd import Stack

    (tmp_path / "endpoints.yaml").write_text("endpoints: []\n")  # left by an earlier run
    stack = Stack(plan_for(tmp_path, "--prefill", "0", "--decode", "2"))  # type: ignore[arg-type]
    path = stack._write_endpoints()
    eps = yaml.safe_load(path.read_text())["endpoints"]
    assert len(eps) == 2
