"""Configuration: defaults, the reference TOML, precedence, and errors that name the setting."""

from __future__ import annotations

from pathlib import Path

import pytest
from support import REPO

from worker.settings import Settings, SettingsError, env_name, load_settings


def test_reference_toml_equals_builtin_defaults() -> None:
    assert load_settings(REPO / "config" / "default.toml", environ={}) == Settings()


def test_precedence_file_env_cli(tmp_path: Path) -> None:
    cfg = tmp_path / "node.toml"
    cfg.write_text('[listener]\nport = 2000\nae_title = "FILEAET"\n[batch]\nsize = 4\n')
    env = {"CXR_TRIAGE_LISTENER_PORT": "3000", "CXR_TRIAGE_LISTENER_ALLOWED_CALLING_AETS": "PACS1, PACS2"}
    s = load_settings(cfg, {"listener.port": 4000, "storage.data_dir": None}, environ=env)
    assert s.listener.port == 4000  # CLI over env over file
    assert s.listener.ae_title == "FILEAET"  # file over default
    assert s.listener.allowed_calling_aets == ["PACS1", "PACS2"]
    assert s.batch.size == 4
    s = load_settings(None, None, environ={**env, "CXR_TRIAGE_CONFIG": str(cfg)})
    assert s.listener.port == 3000 and s.batch.size == 4


def test_storage_defaults_derive_from_data_dir(tmp_path: Path) -> None:
    s = load_settings(None, {"storage.data_dir": str(tmp_path)}, environ={})
    assert s.storage.spool_path == tmp_path / "spool"
    assert s.storage.url == f"sqlite:///{tmp_path.resolve() / 'triage.db'}"
    s = load_settings(None, {"storage.database_url": "postgresql+psycopg://x@h/db"}, environ={})
    assert s.storage.url == "postgresql+psycopg://x@h/db"


@pytest.mark.parametrize(
    "source, expected",
    [
        ({"env": {"CXR_TRIAGE_LISTENER_PORT": "abc"}}, "listener.port (CXR_TRIAGE_LISTENER_PORT) must be of type int"),
        ({"cli": {"listener.port": 70000}}, "listener.port must be 0-65535"),
        ({"cli": {"listener.ae_title": "A" * 17}}, "listener.ae_title must be 1-16"),
        ({"cli": {"batch.size": 0}}, "batch.size must be >= 1"),
        ({"cli": {"model.precision": "fp64"}}, "model.precision must be one of"),
        ({"toml": "[listener]\nprot = 1\n"}, "unknown setting listener.prot"),
        ({"toml": "[nosuch]\n"}, "unknown configuration section [nosuch]"),
        ({"toml": "[listener]\nport = 'x'\n"}, "listener.port"),
        ({"toml": "not toml ="}, "is not valid TOML"),
        ({"env": {"CXR_TRIAGE_LISTENER_REQUIRE_CALLED_AET": "maybe"}}, "listener.require_called_aet"),
    ],
)
def test_errors_name_the_setting(tmp_path: Path, source: dict, expected: str) -> None:
    cfg = None
    if "toml" in source:
        cfg = tmp_path / "bad.toml"
        cfg.write_text(source["toml"])
    with pytest.raises(SettingsError) as err:
        load_settings(cfg, source.get("cli"), environ=source.get("env", {}))
    assert expected in str(err.value)


def test_missing_config_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="does not exist"):
        load_settings(tmp_path / "nope.toml", environ={})


def test_env_names() -> None:
    assert env_name("listener.port") == "CXR_TRIAGE_LISTENER_PORT"
    assert env_name("model.path") == "CXR_TRIAGE_MODEL_PATH"


def test_send_heatmap_from_file_env_and_a_bad_value_names_the_setting(tmp_path: Path) -> None:
    """Issue 17: send.heatmap beside send.secondary_capture, env CXR_TRIAGE_SEND_HEATMAP."""
    assert Settings().send.heatmap is False
    cfg = tmp_path / "node.toml"
    cfg.write_text("[send]\nheatmap = true\n")
    assert load_settings(cfg, environ={}).send.heatmap is True
    assert load_settings(cfg, environ={"CXR_TRIAGE_SEND_HEATMAP": "false"}).send.heatmap is False
    assert load_settings(None, None, environ={"CXR_TRIAGE_SEND_HEATMAP": "true"}).send.heatmap is True
    with pytest.raises(SettingsError, match=r"send\.heatmap \(CXR_TRIAGE_SEND_HEATMAP\)"):
        load_settings(None, None, environ={"CXR_TRIAGE_SEND_HEATMAP": "maybe"})
