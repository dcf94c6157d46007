"""Base for the ``llm-d.ai/role`` filters."""

from __future__ import annotations

from typing import ClassVar

from epp.datastore import EndpointView
from epp.scheduling.plugins._util import NoParams
from epp.scheduling.types import CycleState, Filter, LLMRequest


class RoleFilter(NoParams, Filter):
    """Keep endpoints whose ``llm-d.ai/role`` label is one of ``roles``."""

    roles: ClassVar[frozenset[str]]
    #: Whether endpoints without the role label pass.
    allow_unlabeled: ClassVar[bool] = False

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
