"""A real redis-server for the tests: Debian's binary on a free loopback port, stopped by its pid.

Persistence is confined to the test's directory: an append-only file fsynced on every write
(so a killed and restarted server comes back with everything it acknowledged) and no RDB
snapshots. `kill()` is SIGKILL, a crash; `start()` again brings it back on the same port.

Given `tls`, the server serves TLS only (`--port 0 --tls-port P`) with the certificates made by
tests/tls_certs.py, and asks clients for a certificate as `tls.auth_clients` says.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    # Annotations only: `make bench-scale` imports this module as tests.redis_server, where
    # the tests' folder is not on the import path.
    from tls_certs import Pair

START_TIMEOUT_S = 10.0


def redis_server_binary() -> str:
    found = shutil.which("redis-server") or shutil.which("valkey-server")
    if found is None:
        pytest.fail(
            "redis-server not found: `make test` installs it "
            "(apt-get update && apt-get install -y redis-server)"
        )
    return found


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class RedisTLS:
    """TLS for a test redis-server: its certificate (and the CA it trusts for clients), whether
    clients must present a certificate, and the client pair the fixture itself pings with."""

    server: Pair
    client: Pair
    # redis-server's --tls-auth-clients: "yes" (mutual TLS), "no" or "optional".
    auth_clients: str = "no"


class RedisServer:
    def __init__(
        self, directory: Path, *, port: int | None = None, tls: RedisTLS | None = None
    ) -> None:
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.tls = tls
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        scheme = "rediss" if self.tls is not None else "redis"
        return f"{scheme}://127.0.0.1:{self.port}/0"

    def _listen_arguments(self) -> list[str]:
        if self.tls is None:
            return ["--port", str(self.port)]
        return [
            "--port", "0",
            "--tls-port", str(self.port),
            "--tls-cert-file", str(self.tls.server.cert_file),
            "--tls-key-file", str(self.tls.server.key_file),
            "--tls-ca-cert-file", str(self.tls.server.ca_file),
            "--tls-auth-clients", self.tls.auth_clients,
        ]  # fmt: skip

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        assert not self.running, "already running"
        log = open(self.directory / "redis.log", "ab")  # noqa: SIM115 (owned by the child)
        self._process = subprocess.Popen(
            [
                redis_server_binary(),
                *self._listen_arguments(),
                "--bind", "127.0.0.1",
                "--dir", str(self.directory),
                "--save", "",
                "--appendonly", "yes",
                "--appendfsync", "always",
                "--daemonize", "no",
                "--loglevel", "warning",
                "--databases", "1",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        log.close()
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(
                    f"redis-server exited {self._process.returncode}: "
                    + (self.directory / "redis.log").read_text()[-2000:]
                )
            if self._answers_ping():
                return
            time.sleep(0.02)
        self.kill()
        raise RuntimeError(f"redis-server did not answer on port {self.port}")

    def kill(self) -> None:
        """SIGKILL by pid (a crash), and wait until the process is gone."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=START_TIMEOUT_S)

    def _answers_ping(self) -> bool:
        try:
            with (
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as raw,
                self._wrap(raw) as s,
            ):
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def _wrap(self, raw: socket.socket) -> socket.socket:
        if self.tls is None:
            return raw
        context = ssl.create_default_context(cafile=str(self.tls.client.ca_file))
        # Whether it answers, not whether its certificate names the host: tests check that.
        context.check_hostname = False
        context.load_cert_chain(str(self.tls.client.cert_file), str(self.tls.client.key_file))
        return context.wrap_socket(raw, server_hostname="127.0.0.1")
