"""The EPP's one exception hierarchy, mapped once to an HTTP status and JSON body.

Every layer raises a subclass of :class:`EppError`; only ``epp.handlers`` turns
it into an ext_proc ``ImmediateResponse`` (status + ``{"error": {...}}`` body).
"""

from __future__ import annotations


class EppError(Exception):
    """Base class: an error a client sees as ``status`` with a JSON error body."""

    status: int = 500
    code: str = "internal_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequest(EppError):
    status = 400
    code = "bad_request"


class Forbidden(EppError):
    status = 403
    code = "forbidden"


class PayloadTooLarge(EppError):
    status = 413
    code = "payload_too_large"


class Shed(EppError):
    """The request was dropped under load (sheddable, or the pool is saturated)."""

    status = 429
    code = "rate_limited"


class Internal(EppError):
    status = 500
    code = "internal_error"


class NoReadyEndpoint(EppError):
    status = 503
    code = "no_ready_endpoint"
