"""EndpointPickerConfig loading: defaults, strict errors naming file and key, llm-d configs."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from epp.config import (
    DEFAULT_CONFIG_PATH,
    GIE_DEFAULT_PATH,
    PD_EXAMPLE_PATH,
    ConfigError,
    EndpointPickerConfig,
    PluginKind,
    load_config,
    load_config_text,
    load_default_config,
    register_plugin_kind,
)
from epp.scheduling import build_pipeline

# llm-d's deploy/config/pd-epp-config.yaml, verbatim (see REFERENCE-EPP-AND-PD.md §5.1).
LLMD_PD = """\
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: approx-prefix-cache-producer
  parameters: {maxPrefixTokensToMatch: 16384, lruCapacityPerServer: 31250}
- type: prefix-cache-scorer
- type: queue-scorer
- type: prefill-filter
- type: decode-filter
- type: max-score-picker
- type: disagg-profile-handler
  parameters: {deciders: {prefill: prefix-based-pd-decider}}
- type: prefix-based-pd-decider
  parameters: {nonCachedTokens: 16}
schedulingProfiles:
- name: prefill
  plugins: [{pluginRef: prefill-filter}, {pluginRef: max-score-picker}, {pluginRef: prefix-cache-scorer, weight: 2}, {pluginRef: queue-scorer, weight: 1}]
- name: decode
  plugins: [{pluginRef: decode-filter}, {pluginRef: max-score-picker}, {pluginRef: prefix-cache-scorer, weight: 2}, {pluginRef: queue-scorer, weight: 1}]
"""

HEAD = "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\n"


def err(text: str, source: str = "config.yaml") -> str:
    with pytest.raises(ConfigError) as ei:
        build_pipeline(load_config_text(text, source=source), rng=random.Random(0))
    return str(ei.value)


def refs(profile: object) -> list[tuple[str, float]]:
    return [(r.plugin_ref, r.weight) for r in profile.plugins]  # type: ignore[attr-defined]


def test_default_config_is_prefix_affinity_first(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("INFO", logger="epp.config.loader"):
        cfg = load_default_config()
    assert cfg.source == str(DEFAULT_CONFIG_PATH)
    # The built-in default uses the current apiVersion (no deprecation line at start-up).
    assert cfg.api_version == "llm-d.ai/v1alpha1"
    assert "deprecated" not in caplog.text
    (prof,) = cfg.scheduling_profiles
    assert prof.name == "default"
    assert refs(prof) == [
        ("max-score-picker", 1.0),
        ("prefix-cache-scorer", 4.0),
        ("no-hit-lru-scorer", 1.0),
        ("routed-load-scorer", 2.0),
        ("load-aware-scorer", 4.0),
        ("kv-cache-utilization-scorer", 1.0),
        ("session-affinity-scorer", 10.0),
    ]
    assert dict(cfg.plugin("max-score-picker").parameters) == {"maxNumOfEndpoints": 2}
    assert dict(cfg.plugin("load-aware-scorer").parameters) == {"threshold": 16}
    _check_data_layer_and_handlers(cfg)
    # Every plugin builds.
    pipe = build_pipeline(cfg, rng=random.Random(0))
    assert "approx-prefix-cache-producer" in pipe.plugins


def test_gie_default_example_is_the_gie_chart_default() -> None:
    cfg = load_config(GIE_DEFAULT_PATH)
    (prof,) = cfg.scheduling_profiles
    assert refs(prof) == [
        ("queue-scorer", 2.0),
        ("kv-cache-utilization-scorer", 2.0),
        ("prefix-cache-scorer", 3.0),
        ("max-score-picker", 1.0),  # added by default
    ]
    _check_data_layer_and_handlers(cfg)


def _check_data_layer_and_handlers(cfg: EndpointPickerConfig) -> None:
    assert cfg.profile_handler == "single-profile-handler"
    assert cfg.plugin("single-profile-handler").kind is PluginKind.PROFILE_HANDLER
    assert cfg.saturation_detector == "utilization-detector"
    (src,) = cfg.data_layer
    assert src.plugin_ref == "metrics-data-source"
    assert src.extractors == ("core-metrics-extractor",)
    assert dict(cfg.plugin("metrics-data-source").parameters) == {
        "scheme": "http",
        "path": "/metrics",
        "insecureSkipVerify": True,
    }


def test_llmd_pd_config_loads_unchanged_and_equals_shipped_example() -> None:
    cfg = load_config_text(LLMD_PD, source="pd-epp-config.yaml")
    shipped = load_config(PD_EXAMPLE_PATH)
    assert cfg.profile_handler == "disagg-profile-handler"
    by_name = {p.name: p for p in cfg.scheduling_profiles}
    assert refs(by_name["decode"]) == [
        ("decode-filter", 1.0),
        ("max-score-picker", 1.0),
        ("prefix-cache-scorer", 2.0),
        ("queue-scorer", 1.0),
    ]
    assert refs(by_name["prefill"])[0] == ("prefill-filter", 1.0)
    assert dict(cfg.plugin("prefix-based-pd-decider").parameters) == {"nonCachedTokens": 16}
    # The shipped example is the same configuration.
    assert [(p.name, p.type, dict(p.parameters)) for p in cfg.plugins] == [
        (p.name, p.type, dict(p.parameters)) for p in shipped.plugins
    ]
    assert [refs(p) for p in cfg.scheduling_profiles] == [
        refs(p) for p in shipped.scheduling_profiles
    ]
    pipe = build_pipeline(cfg, rng=random.Random(0))
    assert set(pipe.scheduler.profiles) == {"prefill", "decode"}
    producer = pipe.plugins["approx-prefix-cache-producer"]
    assert producer.max_blocks == 16384 // 16  # type: ignore[attr-defined]
    assert producer.index.capacity_per_endpoint == 31250  # type: ignore[attr-defined]


@pytest.mark.parametrize("api", ["llm-d.ai/v1alpha1", "inference.networking.x-k8s.io/v1alpha1"])
def test_both_api_versions_load(api: str) -> None:
    cfg = load_config_text(
        f"apiVersion: {api}\nkind: EndpointPickerConfig\nplugins:\n- type: queue-scorer\n"
    )
    assert cfg.api_version == api


def test_wrong_api_version_and_kind() -> None:
    assert err("apiVersion: v1\nkind: EndpointPickerConfig\n").startswith(
        "config.yaml: apiVersion: must be one of"
    )
    assert err("apiVersion: llm-d.ai/v1alpha1\nkind: Pod\n").startswith(
        "config.yaml: kind: must be EndpointPickerConfig"
    )


def test_dangling_plugin_ref_names_file_and_key_path() -> None:
    text = HEAD + (
        "plugins:\n- type: queue-scorer\nschedulingProfiles:\n- name: default\n  plugins:\n"
        "  - pluginRef: queue-scorer\n  - pluginRef: foo\n"
    )
    assert (
        err(text) == "config.yaml: schedulingProfiles[0].plugins[1].pluginRef: unknown plugin 'foo'"
    )


def test_error_names_real_file(tmp_path: Path) -> None:
    p = tmp_path / "epp.yaml"
    p.write_text(HEAD + "plugins:\n- type: queue-scorr\n")
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    assert str(ei.value) == (
        f"{p}: plugins[0].type: unknown plugin type 'queue-scorr' (did you mean 'queue-scorer'?)"
    )
    assert ei.value.source == str(p)
    assert ei.value.key == "plugins[0].type"


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (
            "plugins:\n- type: queue-scorer\nschedulingProfile: []\n",
            "config.yaml: schedulingProfile: unknown key (did you mean 'schedulingProfiles'?)",
        ),
        ("plugins: {type: queue-scorer}\n", "config.yaml: plugins: expected a list, got mapping"),
        (
            "plugins:\n- type: queue-scorer\n  params: {}\n",
            "config.yaml: plugins[0].params: unknown key",
        ),
        (
            "plugins:\n- type: queue-scorer\n  parameters: [1]\n",
            "config.yaml: plugins[0].parameters: expected a mapping, got list",
        ),
        (
            "plugins:\n- name: x\n",
            "config.yaml: plugins[0].type: expected a non-empty string, got null None",
        ),
        (
            "plugins:\n- type: queue-scorer\n- type: queue-scorer\n",
            "config.yaml: plugins[1].name: duplicate plugin name 'queue-scorer' (also plugins[0])",
        ),
        ("featureGates: flowControl\n", "config.yaml: featureGates: expected a list, got string"),
        (
            "plugins:\n- type: queue-scorer\nschedulingProfiles:\n- name: a\n  plugins:\n  - {pluginRef: queue-scorer, weight: heavy}\n",
            "config.yaml: schedulingProfiles[0].plugins[0].weight: expected a finite number >= 0, got 'heavy'",
        ),
        (
            "plugins:\n- type: queue-scorer\nschedulingProfiles:\n- name: a\n  plugins:\n  - {pluginRef: queue-scorer, weight: -1}\n",
            "config.yaml: schedulingProfiles[0].plugins[0].weight: expected a finite number >= 0, got -1",
        ),
        (
            "plugins:\n- type: queue-scorer\nschedulingProfiles:\n- name: a\n- name: a\n",
            "config.yaml: schedulingProfiles[1].name: duplicate profile name 'a' (also schedulingProfiles[0])",
        ),
        (
            "plugins:\n- type: queue-scorer\nschedulingProfiles:\n- name: a\n- name: b\n",
            "config.yaml: schedulingProfiles: 2 profiles need a profile-handler plugin (e.g. disagg-profile-handler)",
        ),
        (
            "plugins:\n- type: random-picker\n- type: max-score-picker\nschedulingProfiles:\n- name: a\n  plugins: [{pluginRef: random-picker}, {pluginRef: max-score-picker}]\n",
            "config.yaml: schedulingProfiles[0].plugins[1]: profile 'a' has more than one picker (random-picker, max-score-picker)",
        ),
        (
            "plugins:\n- type: random-picker\n- type: max-score-picker\n",
            "config.yaml: plugins[1].type: several pickers (random-picker, max-score-picker) but no "
            "schedulingProfiles to say which profile uses which; declare schedulingProfiles or keep one picker",
        ),
        (
            "plugins:\n- type: always-disagg-pd-decider\nschedulingProfiles:\n- name: a\n  plugins: [{pluginRef: always-disagg-pd-decider}]\n",
            "config.yaml: schedulingProfiles[0].plugins[0].pluginRef: plugin 'always-disagg-pd-decider' is a decider; profiles take only filters, scorers and pickers",
        ),
        (
            "plugins:\n- type: queue-scorer\nsaturationDetector: {pluginRef: queue-scorer}\n",
            "config.yaml: saturationDetector.pluginRef: plugin 'queue-scorer' is a scorer, not a saturation detector",
        ),
        (
            "plugins:\n- type: single-profile-handler\n- type: disagg-profile-handler\n",
            "config.yaml: plugins[1].type: only one profile handler is allowed (also plugins[0]: single-profile-handler)",
        ),
        (
            "dataLayer:\n  sources:\n  - pluginRef: nope\n",
            "config.yaml: dataLayer.sources[0].pluginRef: unknown plugin 'nope'",
        ),
        (
            "engineConfigs:\n- queuedRequestsSpec: x\n",
            "config.yaml: engineConfigs[0].name: expected a non-empty string, got null None",
        ),
    ],
)
def test_strict_errors(body: str, expected: str) -> None:
    assert err(HEAD + body).startswith(expected)


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (
            "- type: queue-scorer\n  parameters: {foo: 1}\n",
            "config.yaml: plugins[0].parameters.foo: unknown parameter",
        ),
        (
            "- type: load-aware-scorer\n  parameters: {threshold: many}\n",
            "config.yaml: plugins[0].parameters.threshold: expected an integer, got string 'many'",
        ),
        (
            "- type: load-aware-scorer\n  parameters: {threshold: 0}\n",
            "config.yaml: plugins[0].parameters.threshold: must be >= 1, got 0",
        ),
        (
            "- type: max-score-picker\n  parameters: {maxNumOfEndpoints: true}\n",
            "config.yaml: plugins[0].parameters.maxNumOfEndpoints: expected an integer, got boolean True",
        ),
        (
            "- type: approx-prefix-cache-producer\n  parameters: {lruCapacityPerServer: -5}\n",
            "config.yaml: plugins[0].parameters.lruCapacityPerServer: must be >= 1, got -5",
        ),
        (
            "- type: utilization-detector\n  parameters: {kvCacheUtilThreshold: 0}\n",
            "config.yaml: plugins[0].parameters.kvCacheUtilThreshold: must be > 0.0, got 0",
        ),
        (
            "- type: label-selector-filter\n  parameters: {matchExpressions: [{key: a, operator: Near}]}\n",
            "config.yaml: plugins[0].parameters.matchExpressions[0].operator: must be one of In, NotIn, Exists, DoesNotExist; got 'Near'",
        ),
        (
            "- type: disagg-profile-handler\n  parameters: {deciders: {prefill: nope}}\n",
            "config.yaml: plugins[0].parameters.deciders.prefill: unknown plugin 'nope'",
        ),
        (
            "- type: disagg-profile-handler\n  parameters: {deciders: {prefill: queue-scorer}}\n- type: queue-scorer\n",
            "config.yaml: plugins[0].parameters.deciders.prefill: plugin 'queue-scorer' (queue-scorer) is not a Decider",
        ),
        (
            "- type: test-declared-but-unbuilt\n",
            "config.yaml: plugins[0].type: plugin type 'test-declared-but-unbuilt' is not available in this build",
        ),
    ],
)
def test_parameter_errors_name_the_parameter(body: str, expected: str) -> None:
    # A type the catalog knows but no plugin class implements.
    register_plugin_kind("test-declared-but-unbuilt", PluginKind.SCORER)
    assert err(HEAD + "plugins:\n" + body).startswith(expected)


def test_duplicate_yaml_keys_and_bad_yaml_are_errors() -> None:
    assert "duplicate key 'plugins'" in err(HEAD + "plugins: []\nplugins: []\n")
    assert err(HEAD + "plugins: [\n").startswith("config.yaml: line ")
    assert err("") == "config.yaml: empty configuration"


def test_defaults_without_profiles_names_and_weights() -> None:
    cfg = load_config_text(
        HEAD
        + "plugins:\n- type: decode-filter\n- type: queue-scorer\n- name: lat\n  type: load-aware-scorer\n"
        + "- type: random-picker\n- type: metrics-data-source\n"
    )
    (prof,) = cfg.scheduling_profiles
    assert prof.name == "default"
    assert refs(prof) == [
        ("decode-filter", 1.0),
        ("queue-scorer", 1.0),
        ("lat", 1.0),
        ("random-picker", 1.0),
    ]
    assert cfg.plugin("lat").type == "load-aware-scorer"
    assert cfg.plugin("queue-scorer").name == "queue-scorer"  # name defaults to type
    assert cfg.profile_handler == "single-profile-handler"
    # A declared data source keeps its (empty) parameters; the extractor is added.
    assert [s.plugin_ref for s in cfg.data_layer] == ["metrics-data-source"]
    assert cfg.data_layer[0].extractors == ("core-metrics-extractor",)


def test_request_control_and_data_layer_types_are_accepted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level("WARNING", logger="epp.config.loader")
    cfg = load_config_text(
        HEAD
        + "featureGates: [prepareDataPlugins]\n"
        + "plugins:\n- type: approx-prefix-cache-producer\n- type: token-producer\n"
        + "- type: metrics-data-source\n  parameters: {scheme: https, path: /metrics}\n"
        + "- type: core-metrics-extractor\n- type: prefix-cache-scorer\n- type: utilization-detector\n"
        + "  parameters: {queueDepthThreshold: 7}\n"
        + "saturationDetector: {pluginRef: utilization-detector}\n"
        + "dataLayer:\n  sources:\n  - pluginRef: metrics-data-source\n    extractors: [{pluginRef: core-metrics-extractor}]\n"
        + "flowControl: {maxBytes: 100}\n"
        + "engineConfigs:\n- name: vllm\n  queuedRequestsSpec: 'vllm:num_requests_waiting'\n"
    )
    assert cfg.feature_gates == ("prepareDataPlugins",)
    assert cfg.flow_control == {"maxBytes": 100}
    # Accepted for compatibility, but not silently: one warning each at load.
    assert "featureGates prepareDataPlugins have no effect" in caplog.text
    assert "flow control (flowControl) is not implemented" in caplog.text
    assert cfg.engine_configs is not None and cfg.engine_configs[0]["name"] == "vllm"
    pipe = build_pipeline(cfg, rng=random.Random(0))
    assert pipe.saturation_detector.queue_depth == 7  # type: ignore[attr-defined]
    # The scorer found the configured producer instead of creating one.
    assert (
        pipe.plugins["prefix-cache-scorer"].producer is pipe.plugins["approx-prefix-cache-producer"]
    )  # type: ignore[attr-defined]
    assert "metrics-data-source" not in pipe.plugins  # data layer plugins are not built here


def test_prefix_scorer_without_producer_gets_an_implicit_one() -> None:
    pipe = build_pipeline(
        load_config_text(HEAD + "plugins:\n- type: prefix-cache-scorer\n"), rng=random.Random(0)
    )
    producer = pipe.plugins["prefix-cache-scorer"].producer  # type: ignore[attr-defined]
    assert producer.type_name == "approx-prefix-cache-producer"
    assert producer in [p for p, _ in pipe.scheduler.producers]
