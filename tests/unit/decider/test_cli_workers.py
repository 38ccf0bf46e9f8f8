"""`--workers`: what the supervisor passes on to each worker, and what it refuses."""

from __future__ import annotations

import pytest

from decider import config
from decider.cli import workers
from decider.errors import ConfigError


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["serve", "--workers", "2", "--config", "c.toml"], ["serve", "--config", "c.toml"]),
        (["serve", "--workers=2", "--listen=0.0.0.0:1"], ["serve"]),
        (
            [
                "serve",
                "--listen",
                "h:1",
                "--port-file",
                "p",
                "--metrics-listen",
                ":9",
                "--log-level",
                "debug",
            ],
            ["serve", "--log-level", "debug"],
        ),
    ],
)
def test_worker_argv_drops_per_worker_flags(argv: list[str], expected: list[str]) -> None:
    assert workers.worker_argv(argv) == expected


def test_check() -> None:
    memory = config.parse({})
    shared = config.parse({"state": {"backend": "redis"}})
    workers.check(1, memory, demo=False)
    workers.check(4, shared, demo=False)
    with pytest.raises(ConfigError, match="needs \\[state\\] backend"):
        workers.check(2, memory, demo=False)
    with pytest.raises(ConfigError, match="not supported with --demo"):
        workers.check(2, shared, demo=True)
    with pytest.raises(ConfigError, match="flag --workers: 0, must be from 1 to 64"):
        workers.check(0, shared, demo=False)


def test_check_refuses_an_ext_proc_listener() -> None:
    settings = config.parse(
        {"state": {"backend": "redis"}, "ext_proc": {"listen": "127.0.0.1:50061"}}
    )
    with pytest.raises(ConfigError, match="not supported with \\[ext_proc\\] listen"):
        workers.check(2, settings, demo=False)
