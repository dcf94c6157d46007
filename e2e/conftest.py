"""The end-to-end suite's target: a gateway URL.

``--gateway-url URL`` (or ``PDROUTE_E2E_GATEWAY_URL``) points the suite at an existing
gateway, e.g. the kind cluster from ``e2e/kind-up.sh`` (see docs/kubernetes.md).
Without it the suite starts the local stack (``pdroute up``: Envoy + EPP + simulated
decode and prefill servers with sidecars) and tears it down afterwards; that is how
CI runs it on every change.

Tests that must stop or kill a component (fallback, EPP failure) or read the
components' /metrics are marked ``local_stack``; against a remote gateway they are
deselected and the run says how many and why. CI always runs them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from e2e_target import Target, start_local_stack, stop_local_stack


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--gateway-url",
        default=os.environ.get("PDROUTE_E2E_GATEWAY_URL"),
        help="run the e2e suite against this gateway (default: start the local stack)",
    )
    parser.addoption(
        "--e2e-model",
        default=os.environ.get("PDROUTE_E2E_MODEL", "sim-model"),
        help="model name the target serves (sim-model)",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not config.getoption("--gateway-url"):
        return
    local_only = [i for i in items if i.get_closest_marker("local_stack")]
    if not local_only:
        return
    items[:] = [i for i in items if not i.get_closest_marker("local_stack")]
    config.hook.pytest_deselected(items=local_only)
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(
            f"e2e: {len(local_only)} local_stack tests deselected: they stop components or "
            "read their /metrics, which a remote gateway does not allow"
        )


@pytest.fixture(scope="session")
def target(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Target]:
    url = request.config.getoption("--gateway-url")
    model = request.config.getoption("--e2e-model")
    if url:
        yield Target(base_url=url.rstrip("/").removesuffix("/v1"), model=model)
        return
    t = start_local_stack(tmp_path_factory.mktemp("stack"), "--decode", "2", "--prefill", "1")
    try:
        yield t
    finally:
        stop_local_stack(t.proc)


@pytest.fixture
def fresh_local_stack(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Target]:
    """A private local stack for tests that break something; args via indirect param."""
    extra: tuple[str, ...] = getattr(request, "param", ())
    t = start_local_stack(tmp_path, "--decode", "2", "--prefill", "0", *extra)
    try:
        yield t
    finally:
        stop_local_stack(t.proc)
