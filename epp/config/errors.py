"""The one configuration error type and a typed reader for plugin parameters."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any


class ConfigError(ValueError):
    """Invalid configuration; the message names the file (or source) and the key path.

    ``str(err)`` reads ``<source>: <key path>: <problem>``, for example
    ``config.yaml: schedulingProfiles[0].plugins[1].pluginRef: unknown plugin 'foo'``.
    """

    def __init__(self, source: str, key: str, problem: str) -> None:
        self.source = source
        self.key = key
        self.problem = problem
        where = f"{source}: {key}" if key else source
        super().__init__(f"{where}: {problem}")


def type_name(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "list"
    if isinstance(value, Mapping):
        return "mapping"
    return type(value).__name__


class Params:
    """Strict, typed access to one plugin's ``parameters`` mapping.

    Every getter validates type and range and raises :class:`ConfigError` naming
    ``<path>.<key>``; :meth:`finish` rejects keys no getter asked for, so typos
    in a configuration fail loudly instead of being ignored.
    """

    __slots__ = ("_raw", "_seen", "path", "source")

    def __init__(self, raw: Mapping[str, Any] | None, *, source: str, path: str) -> None:
        self._raw: Mapping[str, Any] = raw or {}
        self._seen: set[str] = set()
        self.source = source
        self.path = path

    def key_path(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def error(self, key: str, problem: str) -> ConfigError:
        return ConfigError(self.source, self.key_path(key), problem)

    def names(self) -> list[str]:
        """The keys present in the mapping."""
        return [str(k) for k in self._raw]

    def has(self, key: str) -> bool:
        return key in self._raw

    def _get(self, key: str) -> Any:
        self._seen.add(key)
        return self._raw.get(key)

    def get_any(self, key: str) -> Any:
        return self._get(key)

    def get_int(
        self, key: str, default: int, *, min_value: int | None = None, max_value: int | None = None
    ) -> int:
        v = self._get(key)
        if v is None:
            return default
        if isinstance(v, bool) or not isinstance(v, int):
            if isinstance(v, float) and v.is_integer():
                v = int(v)
            else:
                raise self.error(key, f"expected an integer, got {type_name(v)} {v!r}")
        if min_value is not None and v < min_value:
            raise self.error(key, f"must be >= {min_value}, got {v}")
        if max_value is not None and v > max_value:
            raise self.error(key, f"must be <= {max_value}, got {v}")
        return v

    def get_float(
        self,
        key: str,
        default: float,
        *,
        min_value: float | None = None,
        max_value: float | None = None,
        exclusive_min: bool = False,
    ) -> float:
        v = self._get(key)
        if v is None:
            return default
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise self.error(key, f"expected a number, got {type_name(v)} {v!r}")
        f = float(v)
        if not math.isfinite(f):
            raise self.error(key, f"must be a finite number, got {v!r}")
        if min_value is not None and (f < min_value or (exclusive_min and f == min_value)):
            op = ">" if exclusive_min else ">="
            raise self.error(key, f"must be {op} {min_value}, got {v}")
        if max_value is not None and f > max_value:
            raise self.error(key, f"must be <= {max_value}, got {v}")
        return f

    def get_str(self, key: str, default: str, *, choices: tuple[str, ...] | None = None) -> str:
        v = self._get(key)
        if v is None:
            return default
        if not isinstance(v, str):
            raise self.error(key, f"expected a string, got {type_name(v)} {v!r}")
        if choices is not None and v not in choices:
            raise self.error(key, f"must be one of {', '.join(choices)}; got {v!r}")
        return v

    def get_bool(self, key: str, default: bool) -> bool:
        v = self._get(key)
        if v is None:
            return default
        if not isinstance(v, bool):
            raise self.error(key, f"expected true or false, got {type_name(v)} {v!r}")
        return v

    def get_str_list(self, key: str, default: tuple[str, ...] = ()) -> list[str]:
        v = self._get(key)
        if v is None:
            return list(default)
        if not isinstance(v, list):
            raise self.error(key, f"expected a list of strings, got {type_name(v)}")
        for i, item in enumerate(v):
            if not isinstance(item, str):
                raise self.error(f"{key}[{i}]", f"expected a string, got {type_name(item)}")
        return list(v)

    def get_list(self, key: str) -> list[Any] | None:
        v = self._get(key)
        if v is None:
            return None
        if not isinstance(v, list):
            raise self.error(key, f"expected a list, got {type_name(v)}")
        return v

    def get_params(self, key: str) -> Params | None:
        """A nested mapping as its own :class:`Params` (None when absent)."""
        v = self._get(key)
        if v is None:
            return None
        if not isinstance(v, Mapping):
            raise self.error(key, f"expected a mapping, got {type_name(v)}")
        return Params(v, source=self.source, path=self.key_path(key))

    def finish(self) -> None:
        """Raise for the first key that no getter read (an unknown parameter)."""
        for key in self._raw:
            if key not in self._seen:
                known = ", ".join(sorted(self._seen)) or "none"
                raise self.error(str(key), f"unknown parameter (known: {known})")
