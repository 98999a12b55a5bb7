from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from gguf_appliance.settings import Settings, load_settings, physical_cores


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("GGUF_APPLIANCE_"):
            monkeypatch.delenv(name)


def test_env_file_sets_fields_and_the_environment_wins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env_file = tmp_path / "appliance.env"
    env_file.write_text(
        "GGUF_APPLIANCE_N_CTX=8192\nGGUF_APPLIANCE_PORT=9000\n"
        "GGUF_APPLIANCE_API_KEYS=aaaaaaaaaaaaaaaa, bbbbbbbbbbbbbbbb\n"
    )
    monkeypatch.setenv("GGUF_APPLIANCE_PORT", "9100")
    settings = load_settings(env_file)
    assert settings.n_ctx == 8192
    assert settings.port == 9100
    assert settings.api_keys == ["aaaaaaaaaaaaaaaa", "bbbbbbbbbbbbbbbb"]


def test_env_file_named_by_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env_file = tmp_path / "other.env"
    env_file.write_text("GGUF_APPLIANCE_QUEUE_SIZE=3\n")
    monkeypatch.setenv("GGUF_APPLIANCE_ENV_FILE", str(env_file))
    assert load_settings().queue_size == 3


def test_an_empty_env_file_variable_reads_no_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import gguf_appliance.settings as settings_module

    default = tmp_path / "appliance.env"
    default.write_text("GGUF_APPLIANCE_PORT=9999\n")
    monkeypatch.setattr(settings_module, "DEFAULT_ENV_FILE", default)
    assert load_settings().port == 9999  # the default file is read when it exists
    monkeypatch.setenv("GGUF_APPLIANCE_ENV_FILE", "")
    assert load_settings().port == 8000  # as under systemd: no file read at all


def test_a_named_env_file_that_is_missing_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="env file not found"):
        load_settings(tmp_path / "absent.env")


def test_out_of_range_values_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GGUF_APPLIANCE_N_CTX", "10")
    with pytest.raises(ValidationError, match="n_ctx"):
        Settings()


def test_short_api_keys_are_refused() -> None:
    with pytest.raises(ValidationError, match="16 characters"):
        Settings(api_keys=["short"])


def test_threads_default_to_the_physical_cores() -> None:
    assert Settings().threads == physical_cores() >= 1


def test_every_setting_has_a_description() -> None:
    for name, field in Settings.model_fields.items():
        assert field.description, name


def test_an_open_api_is_off_unless_set(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().open_api is False
    monkeypatch.setenv("GGUF_APPLIANCE_OPEN_API", "true")
    assert Settings().open_api is True
