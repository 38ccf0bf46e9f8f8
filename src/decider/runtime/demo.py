"""`decider serve --demo` (behind `make run`): the example config plus local stand-in model servers.

Each stand-in (decider.runtime.standin) is a tiny OpenAI-compatible HTTP server on 127.0.0.1
answering GET /health, GET /v1/models, GET /metrics (vLLM-style names) and POST
/v1/chat/completions (streamed as Server-Sent Events when asked), so the prober sees healthy
backends and a newcomer can call Decide, then the endpoint it names, at once. One more
stand-in, SPARE, runs unregistered, for the README's RegisterEndpoint example.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

from decider import config
from decider.config import Settings
from decider.core.model import Endpoint
from decider.obs.telemetry import Tracing
from decider.runtime.server import serve
from decider.runtime.standin import StandIn

log = logging.getLogger("decider.demo")

# Slower than a real model server is fast, so requests stay in flight long enough to see on
# /metrics and in ListEndpoints.
FIRST_TOKEN_S = 0.2
PER_TOKEN_S = 0.04
# Served by the demo but not in its config: register it at run time (README.md).
SPARE = Endpoint(
    id="llama-d",
    address="127.0.0.1:18104",
    model="llama-3.1-8b",
    health_url="http://127.0.0.1:18104/health",
)


def load_settings(
    path: str | None, *, env: Mapping[str, str], flags: Mapping[str, Any]
) -> Settings:
    """The embedded demo config, or `path` when given; env and flags override as usual."""
    if path:
        return config.load(path, env=env, flags=flags)
    with resources.as_file(resources.files("decider") / "defaults" / "demo.toml") as demo_path:
        return config.load(demo_path, env=env, flags=flags)


async def start_stand_ins(endpoints: tuple[Endpoint, ...]) -> list[StandIn]:
    """A stand-in for each endpoint on 127.0.0.1; a port already taken is skipped with a warning."""
    started: list[StandIn] = []
    for endpoint in endpoints:
        if not endpoint.address.startswith("127.0.0.1:"):
            continue
        stand_in = StandIn(
            endpoint.id,
            model=endpoint.model,
            first_token_s=FIRST_TOKEN_S,
            per_token_s=PER_TOKEN_S,
        )
        try:
            await stand_in.start(int(endpoint.address.rpartition(":")[2]))
        except OSError as exc:
            log.warning("stand-in for %s not started: %s", endpoint.id, exc)
            continue
        started.append(stand_in)
        log.info("stand-in %s (%s) on http://%s", endpoint.id, endpoint.model, endpoint.address)
    return started


async def run(settings: Settings, *, tracing: Tracing | None = None) -> None:
    spare = () if any(e.id == SPARE.id for e in settings.endpoints) else (SPARE,)
    stand_ins = await start_stand_ins((*settings.endpoints, *spare))
    try:
        await serve(settings, on_ready=lambda server: _print_hint(server.port), tracing=tracing)
    finally:
        for stand_in in stand_ins:
            await stand_in.close()


def _print_hint(port: int) -> None:
    print(hint(port, path=os.environ.get("PATH", "")), flush=True)


def hint(port: int, *, path: str) -> str:
    """What to try next; says how to get grpcurl on PATH when `path` has none."""
    lines = [
        "",
        "Decider demo is serving. Try, in another shell:",
        f'  grpcurl -plaintext -d \'{{"model": "llama-3.1-8b"}}\' '
        f"127.0.0.1:{port} decider.v1.DeciderService/Decide",
        f"  grpcurl -plaintext 127.0.0.1:{port} decider.v1.RegistryService/ListEndpoints",
    ]
    if shutil.which("grpcurl", path=path) is None:
        # The checkout's venv holds this interpreter; make tools puts grpcurl beside it.
        checkout = Path(sys.prefix).parent
        tools = checkout / ".tools" / "bin"
        where = f"{tools} (`make tools` installs it there)"
        if (tools / "grpcurl").exists():
            where = str(tools)
        lines += [
            f"grpcurl is not on your PATH; it lives in {where}. In the checkout, put it and",
            f'the decider command on PATH with:  eval "$(make -s -C {checkout} env)"',
            "or open a shell with both:  make shell",
        ]
    lines += ["Stop with Ctrl-C.", ""]
    return "\n".join(lines)
