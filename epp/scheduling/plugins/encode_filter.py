"""encode-filter: endpoints that can run multimodal encoders (a role label is required)."""

from __future__ import annotations

from epp.scheduling.plugins._roles import RoleFilter
from epp.scheduling.registry import register


@register
class EncodeFilter(RoleFilter):
    type_name = "encode-filter"
    roles = frozenset({"encode", "encode-prefill", "encode-prefill-decode"})
