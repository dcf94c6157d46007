"""``pdroute epp`` start-up: bad configuration fails fast with a clear message."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from epp.cmd import duration
from pdroute.cli import main


def test_durations() -> None:
    assert duration("50ms") == pytest.approx(0.05)
    assert duration("2s") == 2.0
    assert duration("1.5") == 1.5
    assert duration("1m") == 60.0
    with pytest.raises(argparse.ArgumentTypeError, match="10 parsecs"):
        duration("10 parsecs")


def _eps(tmp_path: Path) -> Path:
    p = tmp_path / "eps.yaml"
    p.write_text("endpoints:\n  - {name: a, address: 127.0.0.1, port: 8000}\n")
    return p


def test_no_endpoint_source_is_an_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["epp", "--no-secure-serving"]) == 2
    assert "--endpoints" in capsys.readouterr().err


def test_bad_endpoint_file_names_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "eps.yaml"
    bad.write_text("endpoints:\n  - {name: a, address: 127.0.0.1, port: 99999}\n")
    assert main(["epp", "--endpoints", str(bad)]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "port" in err


def test_bad_config_names_the_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        "apiVersion: inference.networking.x-k8s.io/v1alpha1\n"
        "kind: EndpointPickerConfig\n"
        "plugins:\n- type: no-such-plugin\n"
    )
    assert main(["epp", "--endpoints", str(_eps(tmp_path)), "--config-file", str(cfg)]) == 2
    assert "no-such-plugin" in capsys.readouterr().err


def test_missing_cert_dir_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["epp", "--endpoints", str(_eps(tmp_path)), "--cert-path", str(tmp_path / "nope")]
    args += ["--grpc-port", "0", "--grpc-health-port", "0", "--metrics-port", "-1"]
    assert main(args) == 2
    assert "tls.crt" in capsys.readouterr().err


def test_body_cap_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        main(["epp", "--endpoints", str(_eps(tmp_path)), "--max-request-body-bytes", "0"])
