"""A small asyncio Kubernetes client for pdroute: watches, leader election, pools.

Used by the EPP (``epp.datalayer.kube_source``) and the sidecar (:class:`PoolMembers`
as its SSRF allowlist). It depends on nothing else of ours.

- :mod:`pdroute.kube.client`: :class:`KubeClient` (get/list/watch/create/replace),
  :class:`KubeConfig`, errors, :class:`Backoff`.
- :mod:`pdroute.kube.informer`: :class:`Informer`, a list+watch cache that survives
  API server restarts and 410 Gone without losing or duplicating objects.
- :mod:`pdroute.kube.leader`: :class:`LeaderElector` on a coordination.k8s.io/v1 Lease.
- :mod:`pdroute.kube.pool`: InferencePool v1 resolution rules and :class:`PoolWatcher`.
- :mod:`pdroute.kube.members`: :class:`PoolMembers`.
- :mod:`pdroute.kube.cli`: connection flags (:func:`add_connection_arguments`,
  :func:`kube_config_from_args`).
"""

from pdroute.kube.cli import add_connection_arguments, kube_config_from_args
from pdroute.kube.client import (
    ApiError,
    Backoff,
    KubeClient,
    KubeConfig,
    KubeConfigError,
    KubeError,
    KubeUnavailable,
)
from pdroute.kube.informer import Informer
from pdroute.kube.leader import (
    ElectionConfig,
    KubeLeaseStore,
    LeaderElector,
    LeaseConflict,
    LeaseStore,
)
from pdroute.kube.members import PoolMembers
from pdroute.kube.pool import (
    InvalidPool,
    PoolEndpoint,
    PoolTarget,
    PoolWatcher,
    parse_ports,
    parse_selector,
    pod_ready,
    resolve,
)

__all__ = [
    "ApiError",
    "Backoff",
    "ElectionConfig",
    "Informer",
    "InvalidPool",
    "KubeClient",
    "KubeConfig",
    "KubeConfigError",
    "KubeError",
    "KubeLeaseStore",
    "KubeUnavailable",
    "LeaderElector",
    "LeaseConflict",
    "LeaseStore",
    "PoolEndpoint",
    "PoolMembers",
    "PoolTarget",
    "PoolWatcher",
    "add_connection_arguments",
    "kube_config_from_args",
    "parse_ports",
    "parse_selector",
    "pod_ready",
    "resolve",
]
