"""[ext_proc] and the --ext-proc-* flags, parsed once with errors that name the key."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from decider.config import loader
from decider.config.extproc import ExtProcSettings, HeaderNames
from decider.errors import ConfigError


def test_defaults_serve_no_ext_proc_listener_and_name_fallbacks():
    settings = loader.parse({})
    assert settings.ext_proc == ExtProcSettings()
    assert settings.ext_proc.listen == "" and settings.ext_proc.fallbacks


def test_the_table_and_its_headers_are_read():
    settings = loader.parse(
        {
            "ext_proc": {
                "listen": "127.0.0.1:50061",
                "fallbacks": False,
                "max_body_bytes": 2048,
                "headers": {"tenant": "x-org", "session": "x-conversation"},
            }
        }
    )
    assert settings.ext_proc.listen == "127.0.0.1:50061"
    assert not settings.ext_proc.fallbacks
    assert settings.ext_proc.headers == HeaderNames(tenant="x-org", session="x-conversation")


def test_flags_override_the_file(tmp_path):
    path = tmp_path / "d.toml"
    path.write_text('[ext_proc]\nlisten = "127.0.0.1:1"\n')
    settings = loader.load(
        path, flags={"ext_proc_listen": "127.0.0.1:2", "ext_proc_single_endpoint": True}
    )
    assert settings.ext_proc.listen == "127.0.0.1:2"
    assert not settings.ext_proc.fallbacks


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"listen": "nowhere"}, "ext_proc.listen: 'nowhere', must be HOST:PORT"),
        ({"fallbacks": "yes"}, "ext_proc.fallbacks: 'yes', must be true or false"),
        ({"max_body_bytes": 10}, "ext_proc.max_body_bytes: 10, must be an integer"),
        ({"colour": 1}, "ext_proc.colour: unknown key"),
        ({"headers": {"tenant": "X Org"}}, "ext_proc.headers.tenant: 'X Org', must be a lowercase"),
        ({"headers": {"colour": "x"}}, "ext_proc.headers.colour: unknown key"),
    ],
)
def test_bad_values_name_the_file_key_and_value(table, message):
    with pytest.raises(ConfigError) as caught:
        loader.parse({"ext_proc": table}, source="d.toml")
    assert str(caught.value).startswith(f"d.toml: {message}")


def test_a_bad_listen_flag_is_named():
    with pytest.raises(ConfigError, match="flag --ext-proc-listen: 'x'"):
        loader.load(None, flags={"ext_proc_listen": "x"})


def test_every_problem_of_the_table_is_listed_at_once():
    with pytest.raises(ConfigError) as caught:
        loader.parse(
            {"ext_proc": {"fallbacks": "yes", "max_body_bytes": 10, "headers": {"tenant": "A"}}},
            source="d.toml",
        )
    text = str(caught.value)
    for key in ("ext_proc.fallbacks", "ext_proc.max_body_bytes", "ext_proc.headers.tenant"):
        assert f"d.toml: {key}: " in text


def test_the_table_docs_envoy_md_shows_is_valid_and_spells_the_defaults():
    doc = (Path(__file__).resolve().parents[3] / "docs" / "ENVOY.md").read_text()
    block = re.search(r"```toml\n(\[ext_proc\].*?)```", doc, re.S)
    assert block is not None
    settings = loader.parse(tomllib.loads(block[1]), source="docs/ENVOY.md")
    assert settings.ext_proc == ExtProcSettings(listen="127.0.0.1:50061")
