"""Stand-in model servers for bench-envoy, in a process of their own:
`python bench/envoy/standins.py PORT...` serves one decider.runtime.standin.StandIn per port."""

from __future__ import annotations

import asyncio
import sys

from decider.runtime import event_loop
from decider.runtime.standin import StandIn


async def serve(ports: list[int]) -> None:
    for i, port in enumerate(ports):
        await StandIn(f"model-{i}", model="bench-model").start(port)
    print("stand-ins ready", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    event_loop.run(serve([int(p) for p in sys.argv[1:]]), event_loop="uvloop")
