"""A server that uses neither Redis nor Envoy does not load them: together redis-py and the
ext_proc service (Envoy's protos) add about 10 MB to a process's RSS, in every worker."""

from __future__ import annotations

import subprocess
import sys

PROBE = """
import sys
from decider import config
from decider.runtime.server import DeciderServer

settings = config.parse({"server": {"data_dir": ""}, "endpoints": [
    {"id": "a", "address": "127.0.0.1:20000", "model": "m"}]})
DeciderServer(settings)
print(" ".join(sorted({m.split(".")[0] for m in sys.modules})))
"""


def loaded_packages(script: str) -> set[str]:
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    return set(done.stdout.split())


def test_a_memory_backend_server_loads_neither_redis_nor_envoy() -> None:
    loaded = loaded_packages(PROBE)
    assert "decider" in loaded
    assert not loaded & {"redis", "envoy", "xds", "udpa"}


def test_the_redis_backend_and_the_ext_proc_listener_load_what_they_need() -> None:
    script = PROBE.replace(
        '"server": {"data_dir": ""}',
        '"server": {"data_dir": ""}, "state": {"backend": "redis"}, '
        '"ext_proc": {"listen": "127.0.0.1:0"}',
    )
    assert {"redis", "envoy"} <= loaded_packages(script)
