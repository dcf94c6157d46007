"""Body-based routing: ``pdroute bbr`` copies the JSON ``model`` into a header.

See :mod:`epp.bbr.server` for the protocol and :mod:`epp.bbr.cmd` for the flags.
"""

from epp.bbr.server import MODEL_HEADER, BbrServer, BodyRouter, model_from_body

__all__ = ["MODEL_HEADER", "BbrServer", "BodyRouter", "model_from_body"]
