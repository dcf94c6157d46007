"""Value types of the datastore."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

ROLE_LABEL = "llm-d.ai/role"


def _key(address: str, port: int) -> str:
    if ":" in address and not address.startswith("["):
        return f"[{address}]:{port}"  # IPv6
    return f"{address}:{port}"


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One routable model-server port: ``address:port`` is its identity (the ``key``).

    ``key`` is computed once at construction (scorers read it for every candidate of
    every request); it is not a constructor argument and not part of equality.
    """

    name: str
    address: str
    port: int
    labels: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    #: host:port of the Prometheus endpoint; defaults to address:port.
    metrics_address: str | None = None
    #: Engine type for metric-name mapping (label inference.networking.k8s.io/engine-type).
    engine: str | None = None
    #: ``address:port`` (``[v6]:port``), derived from address and port.
    key: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "key", _key(self.address, self.port))

    @property
    def role(self) -> str | None:
        return self.labels.get(ROLE_LABEL)

    @property
    def metrics_host_port(self) -> str:
        return self.metrics_address or self.key


@dataclass(frozen=True, slots=True)
class EndpointMetrics:
    """The scheduling inputs scraped from one engine's /metrics."""

    waiting: int = 0
    running: int = 0
    kv_cache_usage: float = 0.0  # 0..1
    active_loras: frozenset[str] = frozenset()
    waiting_loras: frozenset[str] = frozenset()
    max_loras: int = 0
    block_size: int | None = None
    num_blocks: int | None = None
    hash_algo: str | None = None
    #: Clock time (datastore clock) the sample was taken; 0 = never scraped.
    updated_at: float = 0.0


@dataclass(frozen=True, slots=True)
class EndpointView:
    """An endpoint with its metrics as seen by one scheduling cycle."""

    endpoint: Endpoint
    metrics: EndpointMetrics
    #: True when metrics are missing or older than the staleness threshold.
    stale: bool
    #: ``endpoint.key``, copied at construction (a plain attribute read on the hot path).
    key: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "key", self.endpoint.key)


@dataclass(frozen=True, slots=True)
class PoolSnapshot:
    """Immutable view of the pool for one scheduling cycle."""

    endpoints: tuple[EndpointView, ...]
    #: Clock time the snapshot was built (a cached snapshot is handed out later,
    #: while it still equals a fresh evaluation).
    taken_at: float

    def by_key(self) -> dict[str, EndpointView]:
        return {v.key: v for v in self.endpoints}
