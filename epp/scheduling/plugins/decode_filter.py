"""decode-filter: endpoints that can decode (and endpoints without a role label)."""

from __future__ import annotations

from epp.scheduling.plugins._roles import RoleFilter
from epp.scheduling.registry import register


@register
class DecodeFilter(RoleFilter):
    type_name = "decode-filter"
    roles = frozenset({"decode", "prefill-decode", "both", "encode-prefill-decode"})
    allow_unlabeled = True
