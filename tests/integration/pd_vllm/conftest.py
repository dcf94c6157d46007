"""Session fixture: one prefill and one decode vLLM-CPU with NixlConnector.

Started once per test session (start-up is 30-60 s each on an idle machine, longer
on a busy one) and always stopped. Each instance pins its OpenMP threads to its
own core and has its own NIXL side channel; see :mod:`pdroute.stack.vllm`.
A missing vLLM environment or model FAILS with the bootstrap command.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from pd_vllm_helpers import PdPair

from pdroute.stack.vllm import VllmNotInstalled, VllmServer, VllmSpec, find_vllm_install
from tests.netutil import free_port


@pytest.fixture(scope="session")
def vllm_pd() -> Iterator[PdPair]:
    try:
        install = find_vllm_install()
    except VllmNotInstalled as e:
        pytest.fail(str(e), pytrace=False)
    work = Path(tempfile.mkdtemp(prefix="pdroute-pd-vllm-"))
    servers = []
    for role, core in (("prefill", "0"), ("decode", "1")):
        spec = VllmSpec(port=free_port(), nixl_side_channel_port=free_port(), cpu_bind=core)
        servers.append(VllmServer(install, spec, work / role))
    try:
        for s in servers:
            s.state_dir.mkdir(parents=True, exist_ok=True)
            s.start()
        for s in servers:
            s.wait_ready(timeout_s=1000)
        yield PdPair(install, servers[0], servers[1], work)
    finally:
        for s in servers:
            s.stop()
        shutil.rmtree(work, ignore_errors=True)
