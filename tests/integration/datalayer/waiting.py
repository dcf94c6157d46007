"""Waiting for the effects of real I/O in the data-layer integration tests."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest


async def until(cond: Callable[[], bool], what: str, limit_s: float, poll_s: float = 0.02) -> None:
    """Poll ``cond`` until true; fail the test naming ``what`` after ``limit_s``."""
    try:
        async with asyncio.timeout(limit_s):
            while not cond():  # noqa: ASYNC110 - waiting for effects of real I/O
                await asyncio.sleep(poll_s)
    except TimeoutError:
        pytest.fail(f"timed out waiting for: {what}")
