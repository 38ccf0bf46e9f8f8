"""event_loop.run: the configured loop, and asyncio when uvloop cannot be imported."""

from __future__ import annotations

import sys

import pytest

from decider.config import EVENT_LOOPS
from decider.runtime import event_loop


async def _which() -> str:
    return event_loop.current()


@pytest.mark.parametrize("name", EVENT_LOOPS)
def test_runs_on_the_configured_loop(name):
    pytest.importorskip("uvloop")
    assert event_loop.run(_which(), event_loop=name) == name


def test_falls_back_to_asyncio_without_uvloop(monkeypatch, caplog):
    # None in sys.modules makes `import uvloop` raise ImportError, as on a platform without it.
    monkeypatch.setitem(sys.modules, "uvloop", None)
    assert event_loop.run(_which(), event_loop="uvloop") == "asyncio"
    assert "uvloop is not installed" in caplog.text
