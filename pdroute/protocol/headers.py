"""HTTP header names of the Gateway API Inference Extension EPP protocol and llm-d.

System-owned headers are set by the EPP only; any value a client sends is
removed before routing so that clients cannot steer traffic.
"""

from __future__ import annotations

DESTINATION_ENDPOINT = "x-gateway-destination-endpoint"
DESTINATION_ENDPOINT_SERVED = "x-gateway-destination-endpoint-served"
DESTINATION_ENDPOINT_SUBSET = "x-gateway-destination-endpoint-subset"
PREFILLER_HOST_PORT = "x-prefiller-host-port"
REQUEST_ID = "x-request-id"
MODEL_NAME = "x-gateway-model-name"
SESSION_TOKEN = "x-session-token"
# Response header the simulator adds so tests can see which server answered.
SERVED_BY = "x-inference-served-by"

ENVOY_LB_NAMESPACE = "envoy.lb"
#: Response headers the EPP may also put in the ``envoy.lb`` routing metadata (known
#: at routing time); pdroute's gateway copies them into the client's response, so
#: they need no ext_proc response round trip.
RESPONSE_HEADERS_FROM_METADATA = (SESSION_TOKEN,)
SUBSET_HINT_NAMESPACE = "envoy.lb.subset_hint"

#: Prefixes and names that only the EPP may set. Matching is on lower-cased names.
SYSTEM_OWNED_PREFIXES: tuple[str, ...] = (
    "x-gateway-destination-endpoint",  # also -served, -subset, -fallback(s), -scores
)
SYSTEM_OWNED_NAMES: frozenset[str] = frozenset(
    {
        PREFILLER_HOST_PORT,
        "x-encoder-hosts-ports",
        "x-data-parallel-host-port",
        "x-kv-cache-source-host-port",
        "content-length",
    }
)


def is_system_owned(name: str) -> bool:
    """True when a client-sent header with this (lower-case) name must be dropped."""
    return name in SYSTEM_OWNED_NAMES or name.startswith(SYSTEM_OWNED_PREFIXES)
