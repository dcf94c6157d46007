"""``pdroute sim`` as a process: prints its ports, serves N replicas, exits on SIGTERM."""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import urllib.request

import orjson
import pytest

from pdroute.sim import cmd


def test_cli_serves_replicas_and_stops_cleanly() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "pdroute.cli", "sim", "--replicas", "3", "--port", "0",
         "--model", "cli-model", "--role", "prefill", "--kv-events-endpoint", "tcp://127.0.0.1:*"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        info = orjson.loads(proc.stdout.readline())
        assert len(info["ports"]) == 3 and len(set(info["ports"])) == 3
        assert all(p is not None for p in info["side_channel_ports"])
        assert all(e.startswith("tcp://127.0.0.1:") for e in info["kv_event_endpoints"])
        for addr in info["addresses"]:
            with urllib.request.urlopen(f"http://{addr}/v1/models", timeout=5) as r:
                assert orjson.loads(r.read())["data"][0]["id"] == "cli-model"
                assert r.headers["x-inference-served-by"] == addr
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--failure-rate", "2"], "failure_rate"),
        (["--lora-modules={bad json"], "--lora-modules"),
        (["--failure-types=nope"], "failure_types"),
        (["--max-num-seqs", "0"], "max_num_seqs"),
    ],
)
def test_cli_rejects_bad_config_naming_the_key(
    argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    parser = argparse.ArgumentParser()
    cmd.add_arguments(parser)
    assert cmd.run(parser.parse_args(argv)) == 2
    err = capsys.readouterr().err
    assert err.startswith("pdroute sim:") and needle in err
