"""Endpoints and their latest metrics: pure, synchronous, clock injected.

``epp.datalayer`` writes (endpoint sources, metric scrapers); schedulers read a
:class:`PoolSnapshot`, an immutable view taken once per scheduling cycle.
"""

from epp.datastore.store import Datastore, EndpointSet
from epp.datastore.types import Endpoint, EndpointMetrics, EndpointView, PoolSnapshot

__all__ = [
    "Datastore",
    "Endpoint",
    "EndpointMetrics",
    "EndpointSet",
    "EndpointView",
    "PoolSnapshot",
]
