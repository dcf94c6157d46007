"""Built-in plugins: importing this package registers every type below.

To add a plugin type: write ``<type>.py`` with a class decorated by
``epp.scheduling.registry.register`` (``type_name``, ``kind``, ``from_params``),
then add its import here. Parameters and formulas: README.md in this folder.
"""

from epp.scheduling.plugins import (
    always_disagg_pd_decider,
    approx_prefix_cache_producer,
    decode_filter,
    disagg_profile_handler,
    encode_filter,
    kv_cache_utilization_scorer,
    label_selector_filter,
    load_aware_scorer,
    lora_affinity_scorer,
    max_score_picker,
    pd_profile_handler,
    prefill_filter,
    prefill_header_handler,
    prefix_based_pd_decider,
    prefix_cache_scorer,
    queue_scorer,
    random_picker,
    running_requests_size_scorer,
    session_affinity_scorer,
    single_profile_handler,
    token_producer,
    utilization_detector,
    weighted_random_picker,
)

__all__ = [
    "always_disagg_pd_decider",
    "approx_prefix_cache_producer",
    "decode_filter",
    "disagg_profile_handler",
    "encode_filter",
    "kv_cache_utilization_scorer",
    "label_selector_filter",
    "load_aware_scorer",
    "lora_affinity_scorer",
    "max_score_picker",
    "pd_profile_handler",
    "prefill_filter",
    "prefill_header_handler",
    "prefix_based_pd_decider",
    "prefix_cache_scorer",
    "queue_scorer",
    "random_picker",
    "running_requests_size_scorer",
    "session_affinity_scorer",
    "single_profile_handler",
    "token_producer",
    "utilization_detector",
    "weighted_random_picker",
]
