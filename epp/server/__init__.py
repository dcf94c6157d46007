"""The EPP's network edge: ext_proc gRPC, gRPC health, Prometheus metrics, TLS."""

from epp.server.runner import EppServer, Ports, ServerOptions

__all__ = ["EppServer", "Ports", "ServerOptions"]
