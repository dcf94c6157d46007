"""Where endpoints come from: a static YAML file, or the Kubernetes API.

An :class:`EndpointSource` runs for the life of the EPP and reports complete
endpoint sets to the datastore (``Datastore.replace_endpoints``); the datastore
becomes *synced* at the first report, which is when the EPP turns ready.
"""

from __future__ import annotations

from typing import Protocol

from epp.datastore import Datastore


class EndpointSource(Protocol):
    async def run(self, datastore: Datastore) -> None:
        """Report endpoint sets to ``datastore`` until cancelled."""
        ...

    def ready(self) -> bool:
        """True once the first complete set was delivered (and, if leader election
        is on, this replica leads)."""
        ...
