"""docs/SCALING.md's [state] example is a valid config, and says what the code does."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from decider import config
from decider.state.settings import StateSettings

DOC = Path(__file__).resolve().parents[3] / "docs" / "SCALING.md"


def test_scaling_config_block_parses() -> None:
    text = DOC.read_text()
    block = re.search(r"<!-- scaling-config begin.*?```toml\n(.*?)```", text, re.S)
    assert block is not None
    state = config.parse(tomllib.loads(block.group(1)), source="docs/SCALING.md").state
    assert state.shared
    assert state.redacted_url() == "rediss://decider:***@redis.internal:6380/0"
    # Every key is shown, so the example is also the reference.
    assert set(tomllib.loads(block.group(1))["state"]) == set(StateSettings.__dataclass_fields__)
