"""grpcurl as a first-class tool: the README's grpcurl session, run as written against the demo.

The session lives once, in README.md between the `grpcurl-session` markers. This test parses
it, runs each command with the real grpcurl binary against the demo configuration (what
`make run` serves, on a free port, seeded so decision ids repeat) and compares what grpcurl
prints with what the README shows. Only these are mapped: the Decider address, the stand-in
model servers' ports (free ones here, 181xx in the README), probe timings, and the wording of
the deadline that ends the WatchHealth call (it depends on which side sees it first).

After an intended change of output, rewrite the README's outputs from a real run:

    DECIDER_UPDATE_README=1 .venv/bin/pytest tests/integration/test_grpcurl.py
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import re
import shlex
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from conftest import Running, running
from decider_support import grpcurl_binary

from decider.runtime import demo
from decider.v1 import endpoint_pb2 as epb
from decider.v1 import registry_service_pb2 as rpb

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
BEGIN = re.compile(r"<!-- grpcurl-session begin[^\n]*-->\n```console\n")
END = "```\n<!-- grpcurl-session end -->"
README_ADDRESS = "127.0.0.1:50051"
# Probe timings change from run to run.
TIMING = re.compile(r"in \d+ ms")
# WatchHealth ends at grpcurl's -max-time; the message depends on which side saw it first.
DEADLINE = re.compile(r"Message: (context deadline exceeded|Deadline Exceeded)")
UPDATE = os.environ.get("DECIDER_UPDATE_README") == "1"


@dataclass
class Step:
    command: str  # as written, continuation lines included
    expected: str


def parse_session(text: str) -> tuple[int, int, list[Step]]:
    """The session block's span in `text` and its commands with the output shown for each."""
    begin = BEGIN.search(text)
    assert begin is not None, "README.md has no grpcurl-session begin marker"
    end = text.index(END, begin.end())
    lines = text[begin.end() : end].splitlines()
    steps: list[Step] = []
    i = 0
    while i < len(lines):
        if not lines[i].startswith("$ "):
            assert not lines[i].strip(), f"README session: output before any command: {lines[i]}"
            i += 1
            continue
        command = [lines[i][2:]]
        # A command goes on while it ends in a backslash or has an unclosed quote.
        while command[-1].endswith("\\") or _unbalanced("\n".join(command)):
            i += 1
            command.append(lines[i])
        i += 1
        output: list[str] = []
        while i < len(lines) and not lines[i].startswith("$ "):
            output.append(lines[i])
            i += 1
        steps.append(Step("\n".join(command), "\n".join(output).strip("\n")))
    return begin.end(), end, steps


def _unbalanced(command: str) -> bool:
    try:
        shlex.split(command)
    except ValueError:
        return True
    return False


def render_session(steps: list[Step]) -> str:
    return (
        "\n\n".join(f"$ {s.command}" + (f"\n{s.expected}" if s.expected else "") for s in steps)
        + "\n"
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.asynccontextmanager
async def demo_server(tmp_path: Path) -> AsyncIterator[tuple[Running, dict[str, str]]]:
    """The demo config and stand-ins, on free ports; yields the server and a map from each
    stand-in's real address back to the README's."""
    settings = demo.load_settings(None, env={}, flags={})
    moved = {}
    endpoints = []
    for endpoint in settings.endpoints:
        address = f"127.0.0.1:{_free_port()}"
        moved[address] = endpoint.address
        endpoints.append(
            replace(
                endpoint,
                address=address,
                health_url=endpoint.health_url.replace(endpoint.address, address),
            )
        )
    settings = replace(
        settings,
        endpoints=tuple(endpoints),
        server=replace(settings.server, listen="127.0.0.1:0", data_dir="", grace_period_s=2.0),
        # First probes within 0.2 s, not the demo's 5 s.
        probe=replace(settings.probe, interval_s=0.2),
    )
    stand_ins = await demo.start_stand_ins(settings.endpoints)
    try:
        async with running(settings, rng=random.Random(2026)) as srv:
            # The session starts with every endpoint healthy, as `make run` a moment after start.
            for _ in range(200):
                reply = await srv.registry.ListEndpoints(rpb.ListEndpointsRequest(), timeout=5)
                if reply.statuses and all(
                    s.health == epb.HEALTH_STATUS_HEALTHY for s in reply.statuses.values()
                ):
                    break
                await asyncio.sleep(0.05)
            else:
                pytest.fail(f"demo endpoints never all healthy: {reply}")
            yield srv, moved
    finally:
        for stand_in in stand_ins:
            await stand_in.close()


async def run_command(grpcurl: str, command: str, address: str) -> tuple[int, str]:
    argv = shlex.split(command.replace("\\\n", " "))
    assert argv[0] == "grpcurl", f"README session runs grpcurl only: {command}"
    argv = [grpcurl, *(address if arg == README_ADDRESS else arg for arg in argv[1:])]
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    return proc.returncode if proc.returncode is not None else -1, out.decode()


def as_documented(text: str, moved: dict[str, str]) -> str:
    for real, shown in moved.items():
        text = text.replace(real, shown)
    return text.strip("\n")


def _comparable(text: str) -> str:
    return DEADLINE.sub("Message: deadline exceeded", TIMING.sub("in N ms", text))


def test_the_readme_session_parses():
    _, _, steps = parse_session(README.read_text())
    commands = [" ".join(shlex.split(s.command.replace("\\\n", " "))) for s in steps]
    assert commands[0] == f"grpcurl -plaintext {README_ADDRESS} list"
    assert any(" describe decider.v1.DeciderService" in c for c in commands)
    for method in (
        "decider.v1.DeciderService/Decide",
        "decider.v1.RegistryService/ListEndpoints",
        "grpc.health.v1.Health/Check",
    ):
        assert any(c.endswith(method) and " -d " in c for c in commands), method


async def test_the_readme_grpcurl_session_runs_as_written(tmp_path):
    grpcurl = grpcurl_binary()
    text = README.read_text()
    start, end, steps = parse_session(text)
    results: list[Step] = []
    async with demo_server(tmp_path) as (srv, moved):
        for step in steps:
            code, out = await run_command(grpcurl, step.command, srv.address)
            shown = as_documented(out, moved)
            same = _comparable(shown) == _comparable(step.expected)
            # An update rewrites only outputs that changed beyond their timings.
            results.append(Step(step.command, step.expected if same else shown))
            if UPDATE:
                continue
            assert same, (
                f"`{step.command}` printed (exit {code}):\n{shown}\n\nREADME.md shows:\n"
                f"{step.expected}\n(after an intended change: DECIDER_UPDATE_README=1)"
            )
            if step.command.endswith("/Decide") and "gpt-7" not in step.command:
                assert code == 0
                assert json.loads(out)["endpoint"]["model"] == "llama-3.1-8b"
    if UPDATE:
        README.write_text(text[:start] + render_session(results) + text[end:])
