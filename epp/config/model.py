"""The parsed, validated and defaulted ``EndpointPickerConfig``.

Everything here is immutable and already checked: names are unique, every
``pluginRef`` resolves, each profile has exactly one picker, there is exactly one
profile handler. Plugin ``parameters`` stay raw mappings: each plugin's factory
validates its own (see :class:`epp.config.Params`), with ``path`` naming where
the plugin was declared so errors point at the right key.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from epp.config.errors import Params
from epp.config.kinds import PluginKind

API_VERSIONS = ("llm-d.ai/v1alpha1", "inference.networking.x-k8s.io/v1alpha1")
KIND = "EndpointPickerConfig"

_EMPTY: Mapping[str, Any] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class PluginSpec:
    """One entry of ``plugins[]`` (or one the loader added as a default)."""

    name: str
    type: str
    kind: PluginKind
    parameters: Mapping[str, Any] = field(default_factory=lambda: _EMPTY)
    #: Key path of the declaration, e.g. ``plugins[3]`` (``<default>`` when added).
    path: str = "<default>"

    def params(self, source: str) -> Params:
        return Params(self.parameters, source=source, path=f"{self.path}.parameters")


@dataclass(frozen=True, slots=True)
class ProfilePluginRef:
    plugin_ref: str
    #: Scorer weight; 1.0 when the config gives none.
    weight: float = 1.0
    path: str = "<default>"


@dataclass(frozen=True, slots=True)
class ProfileSpec:
    name: str
    plugins: tuple[ProfilePluginRef, ...]
    path: str = "<default>"


@dataclass(frozen=True, slots=True)
class DataSourceSpec:
    """``dataLayer.sources[]``: a data-source plugin and the extractors fed by it."""

    plugin_ref: str
    extractors: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class EndpointPickerConfig:
    #: Where the config came from (file path, or ``<config-text>`` / ``<default>``).
    source: str
    api_version: str
    feature_gates: tuple[str, ...]
    plugins: tuple[PluginSpec, ...]
    scheduling_profiles: tuple[ProfileSpec, ...]
    #: Name of the profile-handler plugin.
    profile_handler: str
    #: Name of the saturation-detector plugin.
    saturation_detector: str
    data_layer: tuple[DataSourceSpec, ...]
    #: Raw ``flowControl`` mapping (accepted and exposed; flow control is not implemented).
    flow_control: Mapping[str, Any] | None = None
    #: Name of the parser plugin, or None for the built-in OpenAI parser.
    parser: str | None = None
    #: Raw ``engineConfigs`` list (metric-name mappings for the scraper), if present.
    engine_configs: tuple[Mapping[str, Any], ...] | None = None

    def plugin(self, name: str) -> PluginSpec:
        for p in self.plugins:
            if p.name == name:
                return p
        raise KeyError(name)

    def plugins_of_kind(self, kind: PluginKind) -> list[PluginSpec]:
        return [p for p in self.plugins if p.kind is kind]

    def plugins_of_type(self, plugin_type: str) -> list[PluginSpec]:
        return [p for p in self.plugins if p.type == plugin_type]
