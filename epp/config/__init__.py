"""EndpointPickerConfig: strict loading, defaults, and typed plugin parameters.

The lowest EPP layer: it knows plugin *type names* and their kinds (``kinds``),
not plugin code. ``epp.scheduling`` turns a loaded config into plugin objects.
"""

from epp.config.errors import ConfigError, Params
from epp.config.kinds import PluginKind, known_plugin_types, plugin_kind, register_plugin_kind
from epp.config.loader import (
    DEFAULT_CONFIG_PATH,
    GIE_DEFAULT_PATH,
    PD_EXAMPLE_PATH,
    load_config,
    load_config_text,
    load_default_config,
)
from epp.config.model import (
    API_VERSIONS,
    DataSourceSpec,
    EndpointPickerConfig,
    PluginSpec,
    ProfilePluginRef,
    ProfileSpec,
)

__all__ = [
    "API_VERSIONS",
    "DEFAULT_CONFIG_PATH",
    "GIE_DEFAULT_PATH",
    "PD_EXAMPLE_PATH",
    "ConfigError",
    "DataSourceSpec",
    "EndpointPickerConfig",
    "Params",
    "PluginKind",
    "PluginSpec",
    "ProfilePluginRef",
    "ProfileSpec",
    "known_plugin_types",
    "load_config",
    "load_config_text",
    "load_default_config",
    "plugin_kind",
    "register_plugin_kind",
]
