"""Plugin type registry and the builder that turns a config into plugin objects.

A plugin file declares one class with ``type_name``/``kind`` and decorates it with
:func:`register`; importing ``epp.scheduling.plugins`` registers every built-in.
Adding a plugin type is therefore: write the file, add one import line to
``epp/scheduling/plugins/__init__.py``.

:class:`BuildContext` builds plugins on demand by name, so a plugin can reference
another (the disagg handler its deciders, the prefix scorer its producer) no
matter in which order they were declared. Reference cycles are reported as
:class:`ConfigError`.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from typing import TypeVar

from epp.config import (
    ConfigError,
    EndpointPickerConfig,
    PluginKind,
    PluginSpec,
    register_plugin_kind,
)
from epp.datastore import Datastore
from epp.datastore.store import RemovalListener
from epp.scheduling.types import Plugin, PrefixMatchProducer

P = TypeVar("P", bound=Plugin)
_TYPES: dict[str, type[Plugin]] = {}

#: Kinds that the scheduler/director never instantiate (the data layer and parser
#: read them from the config; flow-control policies are accepted but unused).
NOT_BUILT = frozenset(
    {PluginKind.DATA_SOURCE, PluginKind.DATA_EXTRACTOR, PluginKind.PARSER, PluginKind.FLOW_CONTROL}
)


def register(cls: type[P]) -> type[P]:
    """Class decorator: make ``cls.type_name`` loadable from configs."""
    register_plugin_kind(cls.type_name, cls.kind)
    _TYPES[cls.type_name] = cls
    return cls


def plugin_class(type_name: str) -> type[Plugin] | None:
    return _TYPES.get(type_name)


def registered_types() -> list[str]:
    return sorted(_TYPES)


class BuildContext:
    """What factories may use while building: the config, datastore, rng, and other plugins."""

    def __init__(
        self,
        config: EndpointPickerConfig,
        *,
        datastore: Datastore | None = None,
        rng: random.Random | None = None,
        clock: Callable[[], float] | None = None,
        services: Mapping[str, object] | None = None,
    ) -> None:
        self.config = config
        #: Shared objects the process wiring hands to plugins (e.g. a KV-block index
        #: fed by the data layer), by well-known name. Empty unless given.
        self.services: Mapping[str, object] = services or {}
        self.source = config.source
        self.datastore = datastore
        self.rng = rng or random.Random()
        self.clock = clock or (datastore.clock if datastore is not None else None)
        self._specs = {p.name: p for p in config.plugins}
        self._built: dict[str, Plugin] = {}
        self._building: set[str] = set()
        #: Plugins created implicitly (e.g. a prefix producer for prefix-cache-scorer).
        self.implicit: list[Plugin] = []

    def on_endpoint_removed(self, listener: RemovalListener) -> None:
        """Call ``listener(endpoint key)`` when an endpoint leaves the pool (plugins
        that keep per-endpoint state forget it). No-op without a datastore."""
        if self.datastore is not None:
            self.datastore.on_endpoint_removed(listener)

    def error(self, key: str, problem: str) -> ConfigError:
        return ConfigError(self.source, key, problem)

    @property
    def built(self) -> dict[str, Plugin]:
        return self._built

    def spec(self, name: str) -> PluginSpec | None:
        return self._specs.get(name)

    def build(self, spec: PluginSpec) -> Plugin:
        done = self._built.get(spec.name)
        if done is not None:
            return done
        if spec.name in self._building:
            raise self.error(spec.path, f"plugin {spec.name!r} references itself (cycle)")
        cls = _TYPES.get(spec.type)
        if cls is None:
            raise self.error(
                f"{spec.path}.type", f"plugin type {spec.type!r} is not available in this build"
            )
        self._building.add(spec.name)
        try:
            plugin = cls.from_params(spec.name, spec.params(self.source), self)
        finally:
            self._building.discard(spec.name)
        self._built[spec.name] = plugin
        return plugin

    def plugin(self, name: str, expected: type[P], *, key: str) -> P:
        """The plugin called ``name`` (built now if needed), which must be an ``expected``."""
        spec = self._specs.get(name)
        if spec is None:
            raise self.error(key, f"unknown plugin {name!r}")
        plugin = self.build(spec)
        if not isinstance(plugin, expected):
            raise self.error(key, f"plugin {name!r} ({spec.type}) is not a {expected.__name__}")
        return plugin

    def prefix_producer(self, name: str | None, *, key: str) -> PrefixMatchProducer:
        """The prefix-match producer a consumer reads from.

        ``name`` given -> that plugin. Otherwise the one configured prefix producer,
        or an ``approx-prefix-cache-producer`` with defaults created on first use
        (llm-d auto-creates producers for consumers the same way).
        """
        return self.producer(
            PrefixMatchProducer,  # type: ignore[type-abstract]
            name,
            key=key,
            default_type="approx-prefix-cache-producer",
            param="prefixMatchInfoProducerName",
        )

    def producer(
        self, base: type[P], name: str | None, *, key: str, default_type: str, param: str
    ) -> P:
        """A producer of class ``base`` for a consumer plugin.

        ``name`` given -> that plugin. Otherwise the single configured plugin of that
        class, or one of ``default_type`` with default parameters, created once and
        shared by every consumer.
        """
        if name is not None:
            return self.plugin(name, base, key=key)
        candidates = [
            s
            for s in self.config.plugins
            if (c := _TYPES.get(s.type)) is not None and issubclass(c, base)
        ]
        if len(candidates) > 1:
            names = ", ".join(s.name for s in candidates)
            raise self.error(key, f"several candidates ({names}); name one with {param}")
        if candidates:
            return self.plugin(candidates[0].name, base, key=key)
        done = self._built.get(default_type)
        if isinstance(done, base):
            return done
        cls = _TYPES.get(default_type)
        if cls is None:  # pragma: no cover - built-ins are always registered
            raise self.error(key, f"no {default_type} available")
        spec = PluginSpec(
            name=default_type, type=default_type, kind=cls.kind, path=f"{key}<implicit>"
        )
        plugin = cls.from_params(default_type, spec.params(self.source), self)
        assert isinstance(plugin, base)
        self._built[default_type] = plugin
        self.implicit.append(plugin)
        return plugin
