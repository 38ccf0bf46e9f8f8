"""The WatchHealth loop that keeps a LocalView current, reconnecting with backoff."""

from __future__ import annotations

import asyncio
import logging

from decider.v1 import decider_service_pb2 as dpb
from decider.v1 import decider_service_pb2_grpc as dgrpc
from decider_client._errors import DeciderClientError, rpc_errors
from decider_client._view import LocalView

log = logging.getLogger("decider_client")


async def watch_health(
    api: dgrpc.DeciderServiceAsyncStub, view: LocalView, *, model: str, max_age_s: float
) -> None:
    """Applies WatchHealth messages to `view` until cancelled."""
    backoff_s = 0.1
    while True:
        got = False
        try:
            with rpc_errors():
                # Each stream has a deadline, so a silently dead one gets replaced.
                stream = api.WatchHealth(dpb.WatchHealthRequest(model=model), timeout=max_age_s)
                async for resp in stream:
                    got = True
                    view.apply(resp)
        except DeciderClientError as err:
            log.debug("decider_client: health stream ended: %s", err)
        except Exception:
            # The view must outlive a bad message; the next stream starts with a snapshot.
            log.exception("decider_client: health stream failed")
        backoff_s = 0.1 if got else min(backoff_s * 2, 5.0)
        await asyncio.sleep(backoff_s)
