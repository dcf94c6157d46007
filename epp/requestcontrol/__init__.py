"""Request control: parse a request, admit it, schedule it, and follow its response.

Public entry point: :func:`build_director` (used by ``epp.cmd``), returning an
:class:`EppDirector` that implements :class:`epp.requestcontrol.api.Director`.
"""

from epp.requestcontrol.api import Director, IncomingRequest, ResponseInfo, RoutingDecision
from epp.requestcontrol.director import PRIORITY_HEADER, Decision, EppDirector, build_director
from epp.requestcontrol.parse import ParsedRequest, detect_api, parse_body

__all__ = [
    "PRIORITY_HEADER",
    "Decision",
    "Director",
    "EppDirector",
    "IncomingRequest",
    "ParsedRequest",
    "ResponseInfo",
    "RoutingDecision",
    "build_director",
    "detect_api",
    "parse_body",
]
