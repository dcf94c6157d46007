"""ext_proc stream handling: one state machine per Envoy ``Process`` stream."""

from epp.handlers.stream import (
    CHUNK_LIMIT,
    DEFAULT_MAX_REQUEST_BODY_BYTES,
    StreamHandler,
    error_body,
    immediate_response,
)

__all__ = [
    "CHUNK_LIMIT",
    "DEFAULT_MAX_REQUEST_BODY_BYTES",
    "StreamHandler",
    "error_body",
    "immediate_response",
]
