"""A vLLM-compatible model-server simulator (``pdroute sim``).

Speaks vLLM 0.32's OpenAI API, metrics, KV events (ZMQ) and NixlConnector-style P/D
handoff well enough that a client, the EPP and the P/D sidecar cannot tell it from
vLLM at the protocol level, while costing microseconds per request. Modules:

- :mod:`~pdroute.sim.tokenizer` deterministic local tokenizer and chat template;
- :mod:`~pdroute.sim.kvcache` block pool with prefix caching and LRU eviction (pure);
- :mod:`~pdroute.sim.latency` latency profiles and step-time model (pure, seeded);
- :mod:`~pdroute.sim.engine` continuous-batching scheduler (pure, injected time);
- :mod:`~pdroute.sim.metrics` vLLM metric names, rendered by hand;
- :mod:`~pdroute.sim.kvevents` ZMQ publisher with vLLM's bind/connect rule and replay;
- :mod:`~pdroute.sim.transfer` the P/D side channel (TCP stand-in for NIXL);
- :mod:`~pdroute.sim.api` OpenAI request parsing / response shapes;
- :mod:`~pdroute.sim.server` one server (aiohttp); :mod:`~pdroute.sim.fleet` many.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pdroute.sim.config import SimConfig
    from pdroute.sim.fleet import SimFleet
    from pdroute.sim.latency import PROFILES, get_profile

__all__ = ["PROFILES", "SimConfig", "SimFleet", "get_profile"]

_LAZY = {
    "SimConfig": "pdroute.sim.config",
    "SimFleet": "pdroute.sim.fleet",
    "PROFILES": "pdroute.sim.latency",
    "get_profile": "pdroute.sim.latency",
}


def __getattr__(name: str) -> Any:
    """Import lazily so that ``pdroute.sim.tokenizer`` etc. load without aiohttp/zmq."""
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(name)
    import importlib

    return getattr(importlib.import_module(mod), name)
