"""`decider-probe`: the prober as its own process, reporting to a decider over gRPC."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
from collections.abc import Sequence

from decider.config import load
from decider.config.tls import ClientTLS, add_client_arguments
from decider.errors import ConfigError
from probe.remote import StandaloneProber, local_headers
from probe.settings import ProbeSettings


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="decider-probe",
        description="Probe a decider's endpoints from this host and report the results to it.",
    )
    parser.add_argument(
        "--decider",
        required=True,
        metavar="HOST:PORT",
        help="the decider to probe for and report to",
    )
    parser.add_argument(
        "--admin-token",
        default=os.environ.get("DECIDER_ADMIN_TOKEN", ""),
        help="bearer token for RegistryService (default: $DECIDER_ADMIN_TOKEN)",
    )
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="decider TOML config: its [probe] table, and probe_headers of its [[endpoints]]",
    )
    parser.add_argument(
        "--prober-id",
        default=f"{socket.gethostname()}:{os.getpid()}",
        help="name of this prober in the decider's health reasons (default: host:pid)",
    )
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING"])
    add_client_arguments(parser, os.environ)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(message)s")
    try:
        settings, headers = load_config(args.config)
        tls = ClientTLS.from_args(args)
        credentials = tls.channel_credentials() if tls.active else None
    except ConfigError as exc:
        print(f"decider-probe: {exc}", file=sys.stderr)
        return 2
    standalone = StandaloneProber(
        settings,
        target=args.decider,
        prober_id=args.prober_id,
        admin_token=args.admin_token,
        local=headers,
        credentials=credentials,
        channel_options=tls.channel_options(),
    )
    asyncio.run(_serve(standalone))
    return 0


def load_config(path: str | None) -> tuple[ProbeSettings, dict[str, dict[str, str]]]:
    """The [probe] table and per-endpoint probe headers of a decider config file."""
    if not path:
        return ProbeSettings(), {}
    # The decider's own loader, so one file serves both processes and errors read the same.
    settings = load(path)
    headers = {k: dict(v) for k, v in local_headers(settings.endpoints).items()}
    for endpoint_id, extra in settings.probe.headers.items():
        headers.setdefault(endpoint_id, {}).update(extra)
    return settings.probe, headers


async def _serve(standalone: StandaloneProber) -> None:
    loop = asyncio.get_running_loop()
    task = asyncio.create_task(standalone.run())
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, task.cancel)
    with contextlib.suppress(asyncio.CancelledError):
        await task


if __name__ == "__main__":
    sys.exit(main())
