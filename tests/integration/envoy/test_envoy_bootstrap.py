"""Every bootstrap variant ``pdroute.stack.envoy`` renders is accepted by the real Envoy."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from pdroute.stack import envoy as stack_envoy

pytestmark = pytest.mark.envoy

POOL = ["127.0.0.1:18000", "127.0.0.1:18001"]


def validate(binary: str, opts: stack_envoy.EnvoyOptions, tmp_path: Path) -> None:
    path = tmp_path / "envoy.yaml"
    path.write_text(stack_envoy.bootstrap_yaml(opts))
    r = subprocess.run(
        [binary, "--mode", "validate", "-c", str(path), "--disable-hot-restart", "-l", "warning"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "deprecated" not in (r.stdout + r.stderr).lower()


@pytest.mark.parametrize(
    "variant",
    [
        {},
        {"epp_tls": True, "failure_mode_allow": True},
        {"response_body": True},
        {"mode": stack_envoy.MODE_ORIGINAL_DST, "pool": []},
        {"epp_enabled": False},
        {"epp_health_interval_s": 0, "num_retries": 0},
        {"response_headers": False},
    ],
)
def test_rendered_bootstraps_validate(
    envoy_binary: str, tmp_path: Path, variant: dict[str, object]
) -> None:
    opts = stack_envoy.EnvoyOptions(listen_port=18080, admin_port=18081, epp_port=9002, pool=POOL)
    for k, v in variant.items():
        setattr(opts, k, v)
    validate(envoy_binary, opts, tmp_path)


def test_routing_is_keyed_on_metadata_not_the_header() -> None:
    doc = stack_envoy.render_bootstrap(
        stack_envoy.EnvoyOptions(listen_port=1, admin_port=2, epp_port=3, pool=POOL)
    )
    text = yaml.safe_dump(doc)
    assert "use_http_header: true" not in text
    hcm = doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    ext = hcm["typed_config"]["http_filters"][0]["typed_config"]
    assert ext["metadata_options"] == {"receiving_namespaces": {"untyped": ["envoy.lb"]}}
    assert ext["processing_mode"]["request_body_mode"] == "FULL_DUPLEX_STREAMED"
    pool = doc["static_resources"]["clusters"][1]
    policy = pool["load_balancing_policy"]["policies"][0]["typed_extension_config"]
    assert policy["typed_config"]["override_host_sources"] == [
        {"metadata": {"key": "envoy.lb", "path": [{"key": "x-gateway-destination-endpoint"}]}}
    ]


@pytest.mark.parametrize(
    ("kw", "key"),
    [
        ({"pool": []}, "pool"),
        ({"mode": stack_envoy.MODE_ORIGINAL_DST, "failure_mode_allow": True}, "failure_mode_allow"),
        ({"mode": "nope"}, "mode"),
        ({"pool": ["not-an-address"]}, "not-an-address"),
    ],
)
def test_bad_options_name_the_problem(kw: dict[str, object], key: str) -> None:
    opts = stack_envoy.EnvoyOptions(listen_port=1, admin_port=2, epp_port=3, pool=POOL)
    for k, v in kw.items():
        setattr(opts, k, v)
    with pytest.raises(stack_envoy.EnvoyConfigError, match=key):
        stack_envoy.render_bootstrap(opts)


def test_checked_in_example_is_current() -> None:
    example = Path(stack_envoy.__file__).with_name("envoy-example.yaml")
    body = "\n".join(line for line in example.read_text().splitlines() if not line.startswith("#"))
    assert yaml.safe_load(body) == stack_envoy.render_bootstrap(stack_envoy.example_options())
