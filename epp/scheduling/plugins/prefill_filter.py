"""prefill-filter: endpoints that can prefill (a role label is required)."""

from __future__ import annotations

from epp.scheduling.plugins._roles import RoleFilter
from epp.scheduling.registry import register


@register
class PrefillFilter(RoleFilter):
    type_name = "prefill-filter"
    roles = frozenset(
        {"prefill", "encode-prefill", "prefill-decode", "both", "encode-prefill-decode"}
    )
