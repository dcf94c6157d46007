"""Configuration of simulated servers (one :class:`SimConfig` for a whole fleet).

Endpoint templates: ``kv_events_endpoint``, ``kv_events_topic`` and
``replay_endpoint`` may contain ``{port}`` (the replica's HTTP port), ``{rank}``
(replica index, 0-based), ``{host}`` and ``{model}``. Without a placeholder, a TCP
endpoint's port is offset by the replica index (vLLM's ``offset_endpoint_port`` rule
for data-parallel ranks), so ``--replicas 16 --kv-events-endpoint tcp://*:5557``
gives ports 5557..5572.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from pdroute.sim.latency import LatencyProfile, get_profile

ROLES = ("both", "prefill", "decode", "none")
FAILURE_TYPES = (
    "rate_limit",
    "server_error",
    "invalid_api_key",
    "context_length",
    "invalid_request",
    "model_not_found",
)


@dataclass(frozen=True, slots=True)
class LoraModule:
    name: str
    path: str


@dataclass
class SimConfig:
    model: str = "sim-model"
    host: str = "127.0.0.1"
    #: First HTTP port; replica i listens on port + i. 0 = ephemeral ports.
    port: int = 0
    #: Host name other servers use to reach this one (side channel, SERVED_BY header).
    advertise_host: str | None = None
    profile: LatencyProfile = field(default_factory=lambda: get_profile("fast"))
    block_size: int = 16
    num_blocks: int = 8192
    max_num_seqs: int = 256
    max_model_len: int = 32768
    max_waiting: int = 10_000
    hash_algo: str = "sha256"
    hash_seed: str | None = None
    vocab_size: int = 32000
    kv_events_endpoint: str | None = None
    kv_events_topic: str = "kv@{host}:{port}@{model}"
    replay_endpoint: str | None = None
    replay_buffer_steps: int = 10_000
    role: str = "both"
    side_channel_port: int = 0
    kv_bytes_per_block: int = 4096
    lease_seconds: float = 480.0
    transfer_timeout: float = 5.0
    #: P/D data plane: "tcp" (side channel carries the bytes), "nixl" (NIXL READ over UCX;
    #: needs ``nixl`` importable), "auto" (nixl when importable, else tcp).
    kv_transport: str = "auto"
    failure_rate: float = 0.0
    failure_types: tuple[str, ...] = FAILURE_TYPES
    lora_modules: tuple[LoraModule, ...] = ()
    max_loras: int = 1
    #: LoRA support on (implied by lora_modules); adapters can be (un)loaded at run time
    #: through /v1/load_lora_adapter and /v1/unload_lora_adapter.
    enable_lora: bool = False
    seed: int = 0

    @property
    def lora_enabled(self) -> bool:
        return self.enable_lora or bool(self.lora_modules)

    def validate(self) -> None:
        def bad(key: str, why: str) -> ValueError:
            return ValueError(f"sim config: {key}: {why}")

        if self.role not in ROLES:
            raise bad("role", f"{self.role!r} is not one of {ROLES}")
        for key in ("block_size", "num_blocks", "max_num_seqs", "max_model_len", "max_waiting"):
            if getattr(self, key) <= 0:
                raise bad(key, "must be positive")
        if not 0.0 <= self.failure_rate <= 1.0:
            raise bad("failure_rate", "must be within [0, 1]")
        for t in self.failure_types:
            if t not in FAILURE_TYPES:
                raise bad("failure_types", f"unknown {t!r}; known: {FAILURE_TYPES}")
        if self.kv_transport not in ("auto", "tcp", "nixl"):
            raise bad("kv_transport", f"{self.kv_transport!r} is not one of auto, tcp, nixl")
        if self.kv_bytes_per_block < 0:
            raise bad("kv_bytes_per_block", "must be >= 0")
        if self.lora_enabled and self.max_loras <= 0:
            raise bad("max_loras", "must be positive when LoRA modules are configured")


def substitute(template: str, *, rank: int, port: int, host: str, model: str) -> str:
    """Fill ``{port}``/``{rank}``/``{host}``/``{model}``; offset a bare TCP port by ``rank``."""
    if any(p in template for p in ("{port}", "{rank}", "{host}", "{model}")):
        return template.format(port=port, rank=rank, host=host, model=model)
    if rank == 0:
        return template
    m = re.match(r"^(tcp://.*):(\d+)$", template)
    if m:
        return f"{m.group(1)}:{int(m.group(2)) + rank}"
    if template.startswith(("ipc://", "inproc://")):
        return f"{template}_dp{rank}"
    return template


def parse_lora_modules(specs: list[str]) -> tuple[LoraModule, ...]:
    """vLLM ``--lora-modules`` forms: ``name=path`` or JSON ``{"name":..,"path":..}``."""
    import orjson

    out: list[LoraModule] = []
    for raw in specs:
        spec = raw.strip()
        if spec.startswith("{"):
            try:
                obj = orjson.loads(spec)
                out.append(LoraModule(name=str(obj["name"]), path=str(obj["path"])))
            except (orjson.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"--lora-modules: bad JSON module {spec!r}: {e}") from None
        elif "=" in spec:
            name, path = spec.split("=", 1)
            out.append(LoraModule(name=name, path=path))
        else:
            out.append(LoraModule(name=spec, path=spec))
    return tuple(out)
