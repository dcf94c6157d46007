"""Fixtures for the sidecar unit tests (fakes live in sidecar_fakes.py)."""

from sidecar_fakes import make_harness

__all__ = ["make_harness"]
