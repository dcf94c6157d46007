"""Config validation and per-replica endpoint templates."""

from __future__ import annotations

import pytest

from pdroute.sim.config import LoraModule, SimConfig, parse_lora_modules, substitute


def test_substitute_placeholders_and_rank_offsets() -> None:
    kw = {"port": 8001, "host": "10.0.0.1", "model": "m"}
    assert substitute("tcp://*:{port}", rank=1, **kw) == "tcp://*:8001"  # type: ignore[arg-type]
    assert substitute("kv@{host}:{port}@{model}/{rank}", rank=2, **kw) == "kv@10.0.0.1:8001@m/2"  # type: ignore[arg-type]
    assert substitute("tcp://*:5557", rank=0, **kw) == "tcp://*:5557"  # type: ignore[arg-type]
    assert substitute("tcp://*:5557", rank=3, **kw) == "tcp://*:5560"  # type: ignore[arg-type]
    assert substitute("ipc:///tmp/kv", rank=2, **kw) == "ipc:///tmp/kv_dp2"  # type: ignore[arg-type]
    assert substitute("tcp://127.0.0.1:*", rank=2, **kw) == "tcp://127.0.0.1:*"  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("changes", "key"),
    [
        ({"role": "x"}, "role"),
        ({"block_size": 0}, "block_size"),
        ({"failure_rate": 1.5}, "failure_rate"),
        ({"failure_types": ("boom",)}, "failure_types"),
        ({"lora_modules": (LoraModule("a", "b"),), "max_loras": 0}, "max_loras"),
    ],
)
def test_validate_names_the_key(changes: dict[str, object], key: str) -> None:
    cfg = SimConfig(**changes)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=f"sim config: {key}"):
        cfg.validate()


def test_lora_module_syntaxes() -> None:
    assert parse_lora_modules(["a=/p/a", '{"name": "b", "path": "/p/b"}', "c"]) == (
        LoraModule("a", "/p/a"),
        LoraModule("b", "/p/b"),
        LoraModule("c", "c"),
    )
    with pytest.raises(ValueError, match="--lora-modules"):
        parse_lora_modules(['{"name": 1}'])
