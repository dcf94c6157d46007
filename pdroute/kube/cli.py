"""Connection flags shared by every pdroute process that talks to the API server.

``add_connection_arguments(parser)`` adds ``--kube-api-server``, ``--kube-token-file``,
``--kube-ca-file`` and ``--kube-insecure-skip-tls-verify``; ``kube_config_from_args``
turns them into a :class:`KubeConfig` (in-cluster service account when no server is
given). Errors name the flag.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from pdroute.kube.client import KubeConfig, KubeConfigError


def add_connection_arguments(parser: argparse.ArgumentParser | Any) -> None:
    """Add the connection flags to ``parser`` (a parser or an argument group)."""
    parser.add_argument(
        "--kube-api-server",
        help="API server URL (default: the in-cluster service account)",
    )
    parser.add_argument("--kube-token-file", help="bearer token file (re-read every minute)")
    parser.add_argument("--kube-ca-file", help="CA bundle for the API server's certificate")
    parser.add_argument(
        "--kube-insecure-skip-tls-verify",
        action="store_true",
        help="do not verify the API server's certificate (tests only)",
    )


def kube_config_from_args(args: argparse.Namespace, namespace: str | None = None) -> KubeConfig:
    """The connection the flags describe; ``namespace`` overrides the default one."""
    server = getattr(args, "kube_api_server", None)
    if not server:
        cfg = KubeConfig.in_cluster()
        if namespace is None:
            return cfg
        return KubeConfig(
            server=cfg.server,
            token=cfg.token,
            token_file=cfg.token_file,
            ca_file=cfg.ca_file,
            insecure_skip_tls_verify=cfg.insecure_skip_tls_verify,
            namespace=namespace,
        )
    if not server.startswith(("https://", "http://")):
        raise KubeConfigError(f"--kube-api-server: {server!r} is not an http(s) URL")
    token_file = getattr(args, "kube_token_file", None)
    if token_file and not os.path.exists(token_file):
        raise KubeConfigError(f"--kube-token-file: {token_file} does not exist")
    ca_file = getattr(args, "kube_ca_file", None)
    if ca_file and not os.path.exists(ca_file):
        raise KubeConfigError(f"--kube-ca-file: {ca_file} does not exist")
    return KubeConfig(
        server=server,
        token_file=token_file,
        ca_file=ca_file,
        insecure_skip_tls_verify=bool(getattr(args, "kube_insecure_skip_tls_verify", False)),
        namespace=namespace or "default",
    )
