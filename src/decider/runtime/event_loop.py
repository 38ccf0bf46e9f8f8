"""Runs the server's main coroutine on the configured event loop: uvloop or asyncio's own.

uvloop was measured cheaper per RPC for this grpc.aio server (docs/BENCHMARKS.md, "gRPC
load"); where it is not installed (it has no Windows build) the server says so and runs on
asyncio instead of refusing to start.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any, TypeVar

log = logging.getLogger("decider.server")


_T = TypeVar("_T")


def run(main: Coroutine[Any, Any, _T], *, event_loop: str) -> _T:
    if event_loop == "uvloop":
        try:
            import uvloop
        except ImportError:
            log.warning("server.event_loop: uvloop is not installed, running on asyncio")
        else:
            return uvloop.run(main)
    return asyncio.run(main)


def current() -> str:
    """The running loop's name as [server] event_loop spells it."""
    module = type(asyncio.get_running_loop()).__module__
    return "uvloop" if module.startswith("uvloop") else "asyncio"
