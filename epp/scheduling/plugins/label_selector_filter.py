"""label-selector-filter: a Kubernetes label selector over endpoint labels.

``matchLabels`` (all must equal) and ``matchExpressions`` (``In``, ``NotIn``,
``Exists``, ``DoesNotExist``), combined with AND, as in Kubernetes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Self

from epp.config import Params
from epp.datastore import EndpointView
from epp.scheduling.registry import BuildContext, register
from epp.scheduling.types import CycleState, Filter, LLMRequest

_OPS = ("In", "NotIn", "Exists", "DoesNotExist")
Requirement = tuple[str, str, frozenset[str]]


def matches(
    labels: Mapping[str, str], match_labels: Mapping[str, str], exprs: list[Requirement]
) -> bool:
    for k, v in match_labels.items():
        if labels.get(k) != v:
            return False
    for key, op, values in exprs:
        present = key in labels
        if op == "In":
            if not present or labels[key] not in values:
                return False
        elif op == "NotIn":
            if present and labels[key] in values:
                return False
        elif op == "Exists":
            if not present:
                return False
        elif present:  # DoesNotExist
            return False
    return True


@register
class LabelSelectorFilter(Filter):
    type_name = "label-selector-filter"

    def __init__(
        self, name: str, match_labels: Mapping[str, str], exprs: list[Requirement]
    ) -> None:
        self.name = name
        self.match_labels = dict(match_labels)
        self.exprs = exprs

    @classmethod
    def from_params(cls, name: str, params: Params, ctx: BuildContext) -> Self:
        labels: dict[str, str] = {}
        ml = params.get_params("matchLabels")
        if ml is not None:
            for k in ml.names():
                labels[k] = ml.get_str(k, "")
        exprs: list[Requirement] = []
        raw = params.get_list("matchExpressions") or []
        for i, item in enumerate(raw):
            key = f"matchExpressions[{i}]"
            if not isinstance(item, Mapping):
                raise params.error(key, "expected a mapping with key, operator, values")
            ep = Params(item, source=params.source, path=params.key_path(key))
            k = ep.get_str("key", "")
            if not k:
                raise ep.error("key", "required")
            op = ep.get_str("operator", "", choices=_OPS)
            values = ep.get_str_list("values")
            ep.finish()
            if op in ("In", "NotIn") and not values:
                raise ep.error("values", f"operator {op} needs at least one value")
            if op in ("Exists", "DoesNotExist") and values:
                raise ep.error("values", f"operator {op} takes no values")
            exprs.append((k, op, frozenset(values)))
        params.finish()
        if not labels and not exprs:
            raise params.error("matchLabels", "give matchLabels and/or matchExpressions")
        return cls(name, labels, exprs)

    def filter(
        self, cycle: CycleState, request: LLMRequest, endpoints: list[EndpointView]
    ) -> list[EndpointView]:
        return [e for e in endpoints if matches(e.endpoint.labels, self.match_labels, self.exprs)]
