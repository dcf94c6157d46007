"""NixlConnector's ``kv_transfer_params``, field for field as vLLM uses them.

The prefill leg sends :data:`PREFILL_REQUEST_PARAMS`; the prefill response carries
the decode-side parameters (``do_remote_prefill: true``, ``remote_engine_id``,
``remote_block_ids`` (one list per KV-cache group), ``remote_host``,
``remote_port``, ``tp_size`` ...), which the decode leg passes back verbatim.
"""

from __future__ import annotations

from typing import Any, Final

PREFILL_REQUEST_PARAMS: Final[dict[str, Any]] = {
    "do_remote_decode": True,
    "do_remote_prefill": False,
    "remote_engine_id": None,
    "remote_block_ids": None,
    "remote_host": None,
    "remote_port": None,
}

#: Fields real vLLM 0.32 (NixlConnector, pull mode) returns from a prefill request.
PREFILL_RESPONSE_FIELDS: Final[tuple[str, ...]] = (
    "do_remote_prefill",
    "do_remote_decode",
    "remote_block_ids",
    "remote_engine_id",
    "remote_request_id",
    "remote_host",
    "remote_port",
    "tp_size",
    "dcp_size",
    "pp_size",
    "remote_num_tokens",
    "remote_blocks_expiry_time",
    "transfer_mode",
    "remote_prefill_cached_tokens",
)

#: Token-limit fields forced to 1 on the prefill leg (per API).
PREFILL_TOKEN_LIMIT_FIELDS: Final[tuple[str, ...]] = (
    "max_tokens",
    "max_completion_tokens",
    "min_tokens",
    "max_output_tokens",
)
