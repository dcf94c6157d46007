"""A real etcd + kube-apiserver for the ``kube`` tier (scripts/kube-apiserver.sh).

``kube_cluster`` (session) starts the control plane once in a private temp dir and
yields its URL and tokens; it can stop/start the apiserver process for outage tests.
``admin`` (per test) is an independent admin client (see kube_helpers.py).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
from kube_helpers import Admin, KubeCluster, admin_client

from tests.kubeapi import private_control_plane


@pytest.fixture(scope="session")
def kube_cluster() -> Iterator[KubeCluster]:
    with private_control_plane("pdroute-kube-") as cluster:
        yield cluster


@pytest.fixture
async def admin(kube_cluster: KubeCluster) -> AsyncIterator[Admin]:
    async with admin_client(kube_cluster) as a:
        yield a
