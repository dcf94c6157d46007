"""Load an ``EndpointPickerConfig`` (llm-d / GIE YAML) strictly, then fill in defaults.

Strict means: unknown keys, wrong types, bad values, unknown plugin types, duplicate
names and dangling ``pluginRef`` are all :class:`ConfigError`, whose message names
the source file and the key path. Defaults follow llm-d's loader:

* a plugin's ``name`` defaults to its ``type``;
* no ``schedulingProfiles`` -> one ``default`` profile with every filter, scorer and
  picker, in declaration order;
* a profile without a picker gets ``max-score-picker``;
* one profile and no profile handler -> ``single-profile-handler``;
* scorer ``weight`` defaults to 1;
* no saturation detector -> ``utilization-detector``;
* no ``metrics-data-source`` / ``core-metrics-extractor`` -> both are added, and
  without ``dataLayer`` every source feeds every extractor.

Plugin parameters are validated later by each plugin's factory (``Params``).
This runs once at start-up, so plain PyYAML is fine here.
"""

from __future__ import annotations

import difflib
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from epp.config.errors import ConfigError, type_name
from epp.config.kinds import PROFILE_KINDS, PluginKind, known_plugin_types, plugin_kind
from epp.config.model import (
    API_VERSIONS,
    KIND,
    DataSourceSpec,
    EndpointPickerConfig,
    PluginSpec,
    ProfilePluginRef,
    ProfileSpec,
)

log = logging.getLogger(__name__)

_TOP_KEYS = (
    "apiVersion",
    "kind",
    "featureGates",
    "plugins",
    "schedulingProfiles",
    "saturationDetector",
    "dataLayer",
    "flowControl",
    "parser",
    "engineConfigs",
)
_PACKAGE_DIR = Path(__file__).resolve().parent
DEFAULT_CONFIG_PATH = _PACKAGE_DIR / "default-config.yaml"
PD_EXAMPLE_PATH = _PACKAGE_DIR / "examples" / "pd.yaml"
#: The GIE chart's default (queue 2, KV utilisation 2, prefix 3): pdroute's default until
#: 2026-11-25, kept for drop-in comparisons.
GIE_DEFAULT_PATH = _PACKAGE_DIR / "examples" / "gie-default.yaml"


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate mapping keys instead of keeping the last."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    loader.flatten_mapping(node)
    out: dict[Any, Any] = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in out:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        out[key] = loader.construct_object(value_node, deep=True)
    return out


_StrictLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
    _construct_mapping,  # type: ignore[arg-type]
)


def load_config(path: str | Path) -> EndpointPickerConfig:
    """Read and validate the config file at ``path``."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(str(p), "", f"cannot read config file: {e.strerror or e}") from e
    except UnicodeDecodeError as e:
        raise ConfigError(str(p), "", f"not UTF-8 text: {e}") from e
    return load_config_text(text, source=str(p))


def load_default_config() -> EndpointPickerConfig:
    """The built-in default (the GIE chart default: queue w2, kv-cache w2, prefix w3)."""
    return load_config(DEFAULT_CONFIG_PATH)


def load_config_text(text: str, *, source: str = "<config-text>") -> EndpointPickerConfig:
    """Validate a config given as YAML (or JSON) text; ``source`` names it in errors."""
    try:
        doc = yaml.load(text, Loader=_StrictLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(source, where, f"invalid YAML: {e.problem or e}") from e
    except yaml.YAMLError as e:
        raise ConfigError(source, "", f"invalid YAML: {e}") from e
    return _Builder(source).build(doc)


class _Builder:
    def __init__(self, source: str) -> None:
        self.source = source

    def err(self, key: str, problem: str) -> ConfigError:
        return ConfigError(self.source, key, problem)

    def mapping(self, value: Any, key: str) -> Mapping[str, Any]:
        if not isinstance(value, Mapping):
            raise self.err(key, f"expected a mapping, got {type_name(value)}")
        for k in value:
            if not isinstance(k, str):
                raise self.err(key, f"keys must be strings, got {type_name(k)} {k!r}")
        return value

    def list_(self, value: Any, key: str) -> list[Any]:
        if value is None:
            return []
        if not isinstance(value, list):
            raise self.err(key, f"expected a list, got {type_name(value)}")
        return value

    def string(self, value: Any, key: str) -> str:
        if not isinstance(value, str) or not value:
            raise self.err(key, f"expected a non-empty string, got {type_name(value)} {value!r}")
        return value

    def only_keys(self, m: Mapping[str, Any], allowed: tuple[str, ...], path: str) -> None:
        for k in m:
            if k not in allowed:
                hint = difflib.get_close_matches(k, allowed, n=1)
                extra = f" (did you mean {hint[0]!r}?)" if hint else ""
                raise self.err(_join(path, k), f"unknown key{extra}")

    def ref(self, value: Any, path: str, names: Mapping[str, PluginSpec]) -> PluginSpec:
        if not isinstance(value, Mapping):
            raise self.err(path, f"expected a mapping with pluginRef, got {type_name(value)}")
        self.only_keys(value, ("pluginRef",), path)
        name = self.string(value.get("pluginRef"), _join(path, "pluginRef"))
        spec = names.get(name)
        if spec is None:
            raise self.err(_join(path, "pluginRef"), f"unknown plugin {name!r}")
        return spec

    # -- the document ------------------------------------------------------

    def build(self, doc: Any) -> EndpointPickerConfig:
        if doc is None:
            raise self.err("", "empty configuration")
        top = self.mapping(doc, "")
        self.only_keys(top, _TOP_KEYS, "")
        api_version = top.get("apiVersion")
        if api_version not in API_VERSIONS:
            raise self.err(
                "apiVersion", f"must be one of {', '.join(API_VERSIONS)}; got {api_version!r}"
            )
        if api_version != API_VERSIONS[0]:
            log.info(
                "%s: apiVersion %s is deprecated; use %s", self.source, api_version, API_VERSIONS[0]
            )
        if top.get("kind") != KIND:
            raise self.err("kind", f"must be {KIND}; got {top.get('kind')!r}")

        gates: list[str] = []
        for i, g in enumerate(self.list_(top.get("featureGates"), "featureGates")):
            gates.append(self.string(g, f"featureGates[{i}]"))

        plugins, names = self.plugins(top.get("plugins"))
        profiles = self.profiles(top.get("schedulingProfiles"), plugins, names)
        handler = self.profile_handler(plugins, names, profiles)
        saturation = self.saturation_detector(top.get("saturationDetector"), plugins, names)
        data_layer = self.data_layer(top.get("dataLayer"), plugins, names)

        parser: str | None = None
        if top.get("parser") is not None:
            spec = self.ref(top["parser"], "parser", names)
            if spec.kind is not PluginKind.PARSER:
                raise self.err(
                    "parser.pluginRef", f"plugin {spec.name!r} is a {spec.kind.value}, not a parser"
                )
            parser = spec.name

        flow_control = None
        if top.get("flowControl") is not None:
            flow_control = self.mapping(top["flowControl"], "flowControl")

        self.warn_unimplemented(gates, flow_control, plugins)

        engine_configs = None
        if top.get("engineConfigs") is not None:
            items = []
            for i, ec in enumerate(self.list_(top["engineConfigs"], "engineConfigs")):
                m = self.mapping(ec, f"engineConfigs[{i}]")
                self.string(m.get("name"), f"engineConfigs[{i}].name")
                items.append(m)
            engine_configs = tuple(items)

        return EndpointPickerConfig(
            source=self.source,
            api_version=str(api_version),
            feature_gates=tuple(gates),
            plugins=tuple(plugins),
            scheduling_profiles=tuple(profiles),
            profile_handler=handler,
            saturation_detector=saturation,
            data_layer=data_layer,
            flow_control=flow_control,
            parser=parser,
            engine_configs=engine_configs,
        )

    def warn_unimplemented(
        self, gates: list[str], flow_control: Mapping[str, Any] | None, plugins: list[PluginSpec]
    ) -> None:
        """llm-d configs may carry settings this EPP accepts but does not act on; say
        so once at load instead of silently behaving differently."""
        if gates:
            log.warning(
                "%s: featureGates %s have no effect in this EPP", self.source, ", ".join(gates)
            )
        found = ["flowControl"] if flow_control is not None else []
        found += [p.name for p in plugins if p.kind is PluginKind.FLOW_CONTROL]
        if found:
            log.warning(
                "%s: flow control (%s) is not implemented: requests are not queued; "
                "priority < 0 requests are shed with 429 while the pool is saturated",
                self.source,
                ", ".join(found),
            )

    def plugins(self, raw: Any) -> tuple[list[PluginSpec], dict[str, PluginSpec]]:
        plugins: list[PluginSpec] = []
        names: dict[str, PluginSpec] = {}
        for i, item in enumerate(self.list_(raw, "plugins")):
            path = f"plugins[{i}]"
            m = self.mapping(item, path)
            self.only_keys(m, ("name", "type", "parameters"), path)
            ptype = self.string(m.get("type"), f"{path}.type")
            kind = plugin_kind(ptype)
            if kind is None:
                hint = difflib.get_close_matches(ptype, known_plugin_types(), n=1)
                extra = f" (did you mean {hint[0]!r}?)" if hint else ""
                raise self.err(f"{path}.type", f"unknown plugin type {ptype!r}{extra}")
            name = ptype if m.get("name") is None else self.string(m.get("name"), f"{path}.name")
            if name in names:
                raise self.err(
                    f"{path}.name", f"duplicate plugin name {name!r} (also {names[name].path})"
                )
            params = m.get("parameters")
            params = {} if params is None else dict(self.mapping(params, f"{path}.parameters"))
            spec = PluginSpec(name=name, type=ptype, kind=kind, parameters=params, path=path)
            plugins.append(spec)
            names[name] = spec
        return plugins, names

    def add_default(
        self,
        plugins: list[PluginSpec],
        names: dict[str, PluginSpec],
        ptype: str,
        params: dict[str, Any] | None = None,
    ) -> PluginSpec:
        """Reuse a plugin of ``ptype`` named after its type, or add one."""
        existing = names.get(ptype)
        if existing is not None and existing.type == ptype:
            return existing
        name = ptype if existing is None else f"default-{ptype}"
        kind = plugin_kind(ptype)
        assert kind is not None
        spec = PluginSpec(name=name, type=ptype, kind=kind, parameters=params or {})
        plugins.append(spec)
        names[name] = spec
        return spec

    def profiles(
        self, raw: Any, plugins: list[PluginSpec], names: dict[str, PluginSpec]
    ) -> list[ProfileSpec]:
        items = self.list_(raw, "schedulingProfiles")
        out: list[ProfileSpec] = []
        if not items:
            defaults = [ProfilePluginRef(p.name) for p in plugins if p.kind in PROFILE_KINDS]
            out.append(self.finish_profile(ProfileSpec("default", tuple(defaults)), plugins, names))
            return out
        seen: dict[str, str] = {}
        for i, item in enumerate(items):
            path = f"schedulingProfiles[{i}]"
            m = self.mapping(item, path)
            self.only_keys(m, ("name", "plugins"), path)
            pname = self.string(m.get("name"), f"{path}.name")
            if pname in seen:
                raise self.err(
                    f"{path}.name", f"duplicate profile name {pname!r} (also {seen[pname]})"
                )
            seen[pname] = path
            refs: list[ProfilePluginRef] = []
            used: set[str] = set()
            for j, r in enumerate(self.list_(m.get("plugins"), f"{path}.plugins")):
                rpath = f"{path}.plugins[{j}]"
                rm = self.mapping(r, rpath)
                self.only_keys(rm, ("pluginRef", "weight"), rpath)
                ref = self.string(rm.get("pluginRef"), f"{rpath}.pluginRef")
                spec = names.get(ref)
                if spec is None:
                    raise self.err(f"{rpath}.pluginRef", f"unknown plugin {ref!r}")
                if spec.kind not in PROFILE_KINDS:
                    raise self.err(
                        f"{rpath}.pluginRef",
                        f"plugin {ref!r} is a {spec.kind.value}; profiles take only filters, scorers and pickers",
                    )
                if ref in used:
                    raise self.err(
                        f"{rpath}.pluginRef", f"plugin {ref!r} is listed twice in this profile"
                    )
                used.add(ref)
                weight = 1.0
                if rm.get("weight") is not None:
                    w = rm["weight"]
                    if (
                        isinstance(w, bool)
                        or not isinstance(w, int | float)
                        or not math.isfinite(w)
                        or w < 0
                    ):
                        raise self.err(
                            f"{rpath}.weight", f"expected a finite number >= 0, got {w!r}"
                        )
                    weight = float(w)
                refs.append(ProfilePluginRef(ref, weight, rpath))
            out.append(self.finish_profile(ProfileSpec(pname, tuple(refs), path), plugins, names))
        return out

    def finish_profile(
        self, profile: ProfileSpec, plugins: list[PluginSpec], names: dict[str, PluginSpec]
    ) -> ProfileSpec:
        pickers = [r for r in profile.plugins if names[r.plugin_ref].kind is PluginKind.PICKER]
        if len(pickers) > 1:
            names_ = ", ".join(r.plugin_ref for r in pickers)
            if pickers[1].path != "<default>":
                raise self.err(
                    pickers[1].path, f"profile {profile.name!r} has more than one picker ({names_})"
                )
            # The implicit default profile: point at the second picker's declaration.
            raise self.err(
                f"{names[pickers[1].plugin_ref].path}.type",
                f"several pickers ({names_}) but no schedulingProfiles to say which "
                "profile uses which; declare schedulingProfiles or keep one picker",
            )
        if pickers:
            return profile
        picker = self.add_default(plugins, names, "max-score-picker")
        return ProfileSpec(
            profile.name, (*profile.plugins, ProfilePluginRef(picker.name)), profile.path
        )

    def profile_handler(
        self, plugins: list[PluginSpec], names: dict[str, PluginSpec], profiles: list[ProfileSpec]
    ) -> str:
        handlers = [p for p in plugins if p.kind is PluginKind.PROFILE_HANDLER]
        if len(handlers) > 1:
            raise self.err(
                f"{handlers[1].path}.type",
                f"only one profile handler is allowed (also {handlers[0].path}: {handlers[0].type})",
            )
        if handlers:
            return handlers[0].name
        if len(profiles) > 1:
            raise self.err(
                "schedulingProfiles",
                f"{len(profiles)} profiles need a profile-handler plugin (e.g. disagg-profile-handler)",
            )
        return self.add_default(plugins, names, "single-profile-handler").name

    def saturation_detector(
        self, raw: Any, plugins: list[PluginSpec], names: dict[str, PluginSpec]
    ) -> str:
        if raw is not None:
            spec = self.ref(raw, "saturationDetector", names)
            if spec.kind is not PluginKind.SATURATION_DETECTOR:
                raise self.err(
                    "saturationDetector.pluginRef",
                    f"plugin {spec.name!r} is a {spec.kind.value}, not a saturation detector",
                )
            return spec.name
        existing = [p for p in plugins if p.kind is PluginKind.SATURATION_DETECTOR]
        if len(existing) > 1:
            raise self.err(
                "saturationDetector",
                "several saturation detectors declared; pick one with pluginRef",
            )
        if existing:
            return existing[0].name
        return self.add_default(plugins, names, "utilization-detector").name

    def data_layer(
        self, raw: Any, plugins: list[PluginSpec], names: dict[str, PluginSpec]
    ) -> tuple[DataSourceSpec, ...]:
        if raw is None:
            if not any(p.kind is PluginKind.DATA_SOURCE for p in plugins):
                self.add_default(
                    plugins,
                    names,
                    "metrics-data-source",
                    {"scheme": "http", "path": "/metrics", "insecureSkipVerify": True},
                )
            if not any(p.kind is PluginKind.DATA_EXTRACTOR for p in plugins):
                self.add_default(plugins, names, "core-metrics-extractor")
            extractors = tuple(p.name for p in plugins if p.kind is PluginKind.DATA_EXTRACTOR)
            return tuple(
                DataSourceSpec(p.name, extractors)
                for p in plugins
                if p.kind is PluginKind.DATA_SOURCE
            )
        m = self.mapping(raw, "dataLayer")
        self.only_keys(m, ("sources",), "dataLayer")
        out: list[DataSourceSpec] = []
        for i, s in enumerate(self.list_(m.get("sources"), "dataLayer.sources")):
            path = f"dataLayer.sources[{i}]"
            sm = self.mapping(s, path)
            self.only_keys(sm, ("pluginRef", "extractors"), path)
            src = self.ref({"pluginRef": sm.get("pluginRef")}, path, names)
            if src.kind is not PluginKind.DATA_SOURCE:
                raise self.err(
                    f"{path}.pluginRef",
                    f"plugin {src.name!r} is a {src.kind.value}, not a data source",
                )
            exs: list[str] = []
            for j, e in enumerate(self.list_(sm.get("extractors"), f"{path}.extractors")):
                ex = self.ref(e, f"{path}.extractors[{j}]", names)
                if ex.kind is not PluginKind.DATA_EXTRACTOR:
                    raise self.err(
                        f"{path}.extractors[{j}].pluginRef",
                        f"plugin {ex.name!r} is a {ex.kind.value}, not an extractor",
                    )
                exs.append(ex.name)
            out.append(DataSourceSpec(src.name, tuple(exs)))
        return tuple(out)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key
