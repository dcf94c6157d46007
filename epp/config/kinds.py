"""The catalog of plugin type names the configuration accepts, and what each one is.

``epp.config`` sits below the scheduler, so it cannot import plugin code; it keeps
this small name -> kind table instead. The kind decides where a plugin may be
referenced (only filters, scorers and pickers belong in a scheduling profile) and
how defaults are filled in. ``epp.scheduling.registry.register`` adds new types
here as it registers their factories, so a plugin file is the one place to edit.
"""

from __future__ import annotations

from enum import StrEnum


class PluginKind(StrEnum):
    FILTER = "filter"
    SCORER = "scorer"
    PICKER = "picker"
    PROFILE_HANDLER = "profile-handler"
    DECIDER = "decider"
    #: Request-control data producers (prefix match info, tokens, in-flight load).
    PRODUCER = "producer"
    #: Request-control hooks that are not producers (e.g. prefill-header-handler).
    REQUEST_CONTROL = "request-control"
    SATURATION_DETECTOR = "saturation-detector"
    DATA_SOURCE = "data-source"
    DATA_EXTRACTOR = "data-extractor"
    PARSER = "parser"
    FLOW_CONTROL = "flow-control"


#: Kinds a scheduling profile may reference.
PROFILE_KINDS = frozenset({PluginKind.FILTER, PluginKind.SCORER, PluginKind.PICKER})

_BUILTIN: dict[str, PluginKind] = {
    # filters
    "decode-filter": PluginKind.FILTER,
    "prefill-filter": PluginKind.FILTER,
    "encode-filter": PluginKind.FILTER,
    "label-selector-filter": PluginKind.FILTER,
    # scorers
    "queue-scorer": PluginKind.SCORER,
    "kv-cache-utilization-scorer": PluginKind.SCORER,
    "running-requests-size-scorer": PluginKind.SCORER,
    "load-aware-scorer": PluginKind.SCORER,
    "lora-affinity-scorer": PluginKind.SCORER,
    "prefix-cache-scorer": PluginKind.SCORER,
    "session-affinity-scorer": PluginKind.SCORER,
    "active-request-scorer": PluginKind.SCORER,
    "token-load-scorer": PluginKind.SCORER,
    "no-hit-lru-scorer": PluginKind.SCORER,
    "routed-load-scorer": PluginKind.SCORER,  # pdroute
    # pickers
    "max-score-picker": PluginKind.PICKER,
    "random-picker": PluginKind.PICKER,
    "weighted-random-picker": PluginKind.PICKER,
    # profile handlers and P/D deciders
    "single-profile-handler": PluginKind.PROFILE_HANDLER,
    "disagg-profile-handler": PluginKind.PROFILE_HANDLER,
    "pd-profile-handler": PluginKind.PROFILE_HANDLER,
    "prefix-based-pd-decider": PluginKind.DECIDER,
    "always-disagg-pd-decider": PluginKind.DECIDER,
    # request control
    "approx-prefix-cache-producer": PluginKind.PRODUCER,
    "precise-prefix-cache-producer": PluginKind.PRODUCER,
    "token-producer": PluginKind.PRODUCER,
    "inflight-load-producer": PluginKind.PRODUCER,
    "prefill-header-handler": PluginKind.REQUEST_CONTROL,
    "utilization-detector": PluginKind.SATURATION_DETECTOR,
    # data layer (consumed by epp.datalayer, not by the scheduler)
    "metrics-data-source": PluginKind.DATA_SOURCE,
    "core-metrics-extractor": PluginKind.DATA_EXTRACTOR,
    # parsers
    "openai-parser": PluginKind.PARSER,
    # flow control policies (accepted; flow control itself is not implemented)
    "fcfs-ordering-policy": PluginKind.FLOW_CONTROL,
    "global-strict-fairness-policy": PluginKind.FLOW_CONTROL,
    "round-robin-fairness-policy": PluginKind.FLOW_CONTROL,
}

_registered: dict[str, PluginKind] = dict(_BUILTIN)


def register_plugin_kind(plugin_type: str, kind: PluginKind) -> None:
    """Make ``plugin_type`` known to the loader (idempotent; a kind never changes)."""
    old = _registered.get(plugin_type)
    if old is not None and old is not kind:
        raise ValueError(f"plugin type {plugin_type!r} is already a {old.value}, not {kind.value}")
    _registered[plugin_type] = kind


def plugin_kind(plugin_type: str) -> PluginKind | None:
    """The kind of a known plugin type, or None when the type is unknown."""
    return _registered.get(plugin_type)


def known_plugin_types() -> list[str]:
    return sorted(_registered)
