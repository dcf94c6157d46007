#!/usr/bin/env python3
"""Build offline kubeconform schemas from Kubernetes' OpenAPI and from CRD files.

kubeconform normally downloads JSON schemas from GitHub; these machines reach only
package registries, so the schemas are derived from sources the Go module proxy
serves: ``api/openapi-spec/swagger.json`` of ``k8s.io/kubernetes`` (built-in kinds)
and CustomResourceDefinition YAML (Gateway API, InferencePool, Envoy Gateway, ...).

Layout: ``OUT/<group>/<kind>_<version>.json`` where ``<group>`` is the API group, or
the version for the core group; kubeconform finds them with::

    -schema-location 'OUT/{{ .Group }}/{{ .ResourceKind }}_{{ .ResourceAPIVersion }}.json'

The schemas are *strict*: every object schema that lists ``properties`` (and does not
say ``x-kubernetes-preserve-unknown-fields``) rejects unknown keys, so a misspelled
field in a manifest fails validation instead of being dropped by the API server.
Fields may be ``null`` (YAML ``key:`` with no value is legal and the server prunes it).
Each built-in kind's file carries only the definitions it reaches (``#/definitions/..``).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

JSON = dict[str, Any]
# libyaml when available: the CRD files are tens of megabytes.
_Loader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

_INT_OR_STRING: JSON = {"anyOf": [{"type": "integer"}, {"type": "string"}, {"type": "null"}]}
_QUANTITY: JSON = {"anyOf": [{"type": "number"}, {"type": "string"}, {"type": "null"}]}
_SPECIAL = {
    "io.k8s.apimachinery.pkg.util.intstr.IntOrString": _INT_OR_STRING,
    "io.k8s.apimachinery.pkg.api.resource.Quantity": _QUANTITY,
}


_SCHEMA_MAPS = ("properties", "patternProperties", "definitions")
_SCHEMA_LISTS = ("allOf", "anyOf", "oneOf")
_SCHEMA_ONE = ("items", "additionalProperties", "not")


def strictify(node: JSON) -> JSON:
    """Return a copy of an OpenAPI schema as strict, null-tolerant JSON schema."""
    if node.get("x-kubernetes-int-or-string") is True:
        return dict(_INT_OR_STRING)
    out: JSON = {}
    for key, value in node.items():
        if key in _SCHEMA_MAPS and isinstance(value, dict):
            out[key] = {k: strictify(v) for k, v in value.items()}
        elif key in _SCHEMA_LISTS and isinstance(value, list):
            out[key] = [strictify(v) for v in value]
        elif key in _SCHEMA_ONE and isinstance(value, dict):
            out[key] = strictify(value)
        elif key != "nullable":
            out[key] = value
    t = out.get("type")
    if isinstance(t, str):
        out["type"] = [t, "null"]
        if "enum" in out and None not in out["enum"]:
            out["enum"] = [*out["enum"], None]
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not node.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def _refs(node: Any, acc: set[str]) -> None:
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/definitions/"):
            acc.add(ref.removeprefix("#/definitions/"))
        for v in node.values():
            _refs(v, acc)
    elif isinstance(node, list):
        for v in node:
            _refs(v, acc)


def _closure(root: str, defs: JSON) -> list[str]:
    seen: set[str] = set()
    todo = [root]
    while todo:
        name = todo.pop()
        if name in seen or name not in defs:
            continue
        seen.add(name)
        found: set[str] = set()
        _refs(defs[name], found)
        todo.extend(found - seen)
    return sorted(seen)


def _write(out: Path, group: str, version: str, kind: str, schema: JSON) -> Path:
    path = out / (group or version) / f"{kind.lower()}_{version}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(schema, separators=(",", ":")))
    return path


def from_swagger(swagger: JSON, out: Path) -> int:
    """Write one schema per built-in kind of a Kubernetes swagger.json (v2)."""
    raw: JSON = swagger["definitions"]
    defs: JSON = {
        name: (dict(_SPECIAL[name]) if name in _SPECIAL else strictify(d))
        for name, d in raw.items()
    }
    count = 0
    for name, d in raw.items():
        for gvk in d.get("x-kubernetes-group-version-kind", []):
            schema: JSON = {
                "$schema": "http://json-schema.org/draft-07/schema#",
                "$ref": f"#/definitions/{name}",
                "definitions": {n: defs[n] for n in _closure(name, defs)},
            }
            _write(out, gvk.get("group", ""), gvk["version"], gvk["kind"], schema)
            count += 1
    return count


def from_crds(docs: Iterable[Any], out: Path) -> int:
    """Write one schema per served version of every CRD in ``docs``."""
    count = 0
    for doc in docs:
        if not isinstance(doc, dict) or doc.get("kind") != "CustomResourceDefinition":
            continue
        spec = doc["spec"]
        group, kind = spec["group"], spec["names"]["kind"]
        for version in spec.get("versions", []):
            schema = (version.get("schema") or {}).get("openAPIV3Schema")
            if not schema:
                continue
            converted: JSON = strictify(schema)
            # The API server always accepts these, whatever the CRD's schema lists
            # (Istio's CRDs, for one, describe only spec and status).
            props = converted.setdefault("properties", {})
            props.setdefault("apiVersion", {"type": "string"})
            props.setdefault("kind", {"type": "string"})
            props.setdefault("metadata", {"type": "object"})
            converted["$schema"] = "http://json-schema.org/draft-07/schema#"
            _write(out, group, version["name"], kind, converted)
            count += 1
    return count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="schema directory to write")
    parser.add_argument("--swagger", type=Path, help="Kubernetes api/openapi-spec/swagger.json")
    parser.add_argument("crds", nargs="*", type=Path, help="CRD YAML files or directories")
    args = parser.parse_args(argv)
    total = 0
    if args.swagger:
        total += from_swagger(json.loads(args.swagger.read_text()), args.out)
    files: list[Path] = []
    for p in args.crds:
        files.extend(sorted(p.rglob("*.y*ml")) if p.is_dir() else [p])
    for f in files:
        try:
            total += from_crds(yaml.load_all(f.read_text(), Loader=_Loader), args.out)
        except yaml.YAMLError as exc:
            print(f"crd2schema: {f}: not YAML: {exc}", file=sys.stderr)
            return 2
    print(f"crd2schema: wrote {total} schemas to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
