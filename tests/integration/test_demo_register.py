"""The README's RegisterEndpoint example, run as written with grpcurl against the demo: the
spare stand-in it registers is probed at once, turns HEALTHY and takes its share of decisions."""

from __future__ import annotations

import asyncio
import re
import shlex
import socket
import time
from dataclasses import replace
from pathlib import Path

from conftest import running
from decider_support import grpcurl_binary

from decider.runtime import demo
from decider.v1 import decider_service_pb2 as dpb
from decider.v1 import endpoint_pb2 as epb
from decider.v1 import registry_service_pb2 as rpb

README = Path(__file__).resolve().parents[2] / "README.md"
EXAMPLE = re.compile(r"<!-- register-example[^\n]*-->\n```sh\n(.*?)```", re.S)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_the_readme_register_example_works_against_the_demo():
    match = EXAMPLE.search(README.read_text())
    assert match, "README.md has no register-example block"
    command = match.group(1).replace("\\\n", " ")
    assert demo.SPARE.address in command and demo.SPARE.health_url in command

    settings = demo.load_settings(None, env={}, flags={})
    spare_address = f"127.0.0.1:{_free_port()}"
    spare = replace(
        demo.SPARE,
        address=spare_address,
        health_url=demo.SPARE.health_url.replace(demo.SPARE.address, spare_address),
    )
    # The config's own stand-ins are left out: the spare is what the example is about.
    settings = replace(
        settings,
        endpoints=(),
        server=replace(settings.server, listen="127.0.0.1:0", data_dir="", grace_period_s=1.0),
    )
    (stand_in,) = await demo.start_stand_ins((spare,))
    try:
        async with running(settings) as srv:
            argv = shlex.split(
                command.replace(demo.SPARE.address, spare_address).replace(
                    "127.0.0.1:50051", srv.address
                )
            )
            assert argv[0] == "grpcurl"
            proc = await asyncio.create_subprocess_exec(
                grpcurl_binary(), *argv[1:], stdout=asyncio.subprocess.PIPE
            )
            out, _ = await asyncio.wait_for(proc.communicate(), 30)
            assert proc.returncode == 0, out
            assert b'"created": true' in out

            deadline = time.monotonic() + 10
            while True:
                listed = await srv.registry.ListEndpoints(rpb.ListEndpointsRequest())
                status = listed.statuses["llama-d"]
                if status.health == epb.HEALTH_STATUS_HEALTHY:
                    break
                assert time.monotonic() < deadline, status
                await asyncio.sleep(0.05)
            assert status.health_reason.startswith("probe ok")
            decision = await srv.decider.Decide(dpb.DecideRequest(model="llama-3.1-8b"))
            assert decision.endpoint.id == "llama-d"
    finally:
        await stand_in.close()
