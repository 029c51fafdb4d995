"""The settings tree: defaults, file, environment and flags in that order, and clear errors."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from loraplex.server.config import SettingsError, add_flags, flag_overrides, load_settings


def test_defaults() -> None:
    settings = load_settings(environ={})
    assert settings.model.base_model == "embedded"
    assert settings.engine.max_queue == 16  # derived: max_running // 2
    assert load_settings(environ={"LORAPLEX_ENGINE__MAX_RUNNING": "5"}).engine.max_queue == 2
    assert load_settings(environ={"LORAPLEX_ENGINE__MAX_RUNNING": "1"}).engine.max_queue == 1


def test_precedence_file_env_flags(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("engine:\n  max_queue: 10\n  max_running: 3\nadapters:\n  roots: [a, b]\n")
    environ = {"LORAPLEX_ENGINE__MAX_QUEUE": "20", "LORAPLEX_ENGINE__MAX_RUNNING": "4"}
    parser = argparse.ArgumentParser()
    add_flags(parser)
    args = parser.parse_args(["--engine.max-running", "5", "--adapter-root", "x,y", "--port", "1234"])
    settings = load_settings(config, environ=environ, overrides=flag_overrides(args))
    assert settings.engine.max_queue == 20  # env over file
    assert settings.engine.max_running == 5  # flag over env
    assert settings.adapters.roots == (Path("x"), Path("y"))
    assert settings.server.port == 1234


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"LORAPLEX_ENGINE__MAX_QUEUE": "0"}, "engine.max_queue"),
        ({"LORAPLEX_ENGINE__NOPE": "1"}, "unknown setting 'engine.nope'"),
        ({"LORAPLEX_MODEL__QUANTIZATION": "int4"}, "model.quantization"),
        ({"LORAPLEX_ENGINE__MAX_SEQ_LEN": "999999"}, "exceeds engine.kv_cache_tokens"),
    ],
)
def test_invalid_settings_name_the_key(environ: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        load_settings(environ=environ)


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="cannot read settings file"):
        load_settings(tmp_path / "missing.yaml", environ={})
