"""Base for the ``llm-d.ai/role`` filters."""

from __future__ import annotations

from typing import ClassVar, Self

from epp.config import Params
from epp.datastore import EndpointView
from epp.scheduling.registry import BuildContext
from epp.scheduling.types import CycleState, Filter, LLMRequest


class RoleFilter(Filter):
    """Keep endpoints whose ``llm-d.ai/role`` label is one of ``roles``."""

    roles: ClassVar[frozenset[str]]
    #: Whether endpoints without the role label pass.
    allow_unlabeled: ClassVar[bool] = False

    def __init__(self, name: str) -> None:
        self.name = name

    @classmethod
    def from_params(cls, name: str, params: Params, ctx: BuildContext) -> Self:
        params.finish()
        return cls(name)

    def filter(
        self, cycle: CycleState, request: LLMRequest, endpoints: list[EndpointView]
    ) -> list[EndpointView]:
        roles = self.roles
        unlabeled = self.allow_unlabeled
        out = []
        for e in endpoints:
            role = e.endpoint.role
            if (role is None and unlabeled) or (role is not None and role in roles):
                out.append(e)
        return out
