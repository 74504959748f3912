from __future__ import annotations

from pathlib import Path

import pytest

from daemon import config_docs
from daemon.config import (
    Settings,
    format_go_duration,
    format_size,
    load_settings,
    parse_go_duration_s,
    parse_host,
    parse_size_bytes,
    unknown_environment_settings,
)
from daemon.errors import InvalidConfig

CONFIG_FILE = Path(__file__).parents[1] / "configs" / "emberd.toml"


def test_the_documented_file_holds_exactly_the_defaults(tmp_path: Path) -> None:
    environ = {"XDG_DATA_HOME": str(tmp_path)}
    assert load_settings(environ, CONFIG_FILE) == load_settings(environ)


def test_defaults() -> None:
    settings = load_settings({"XDG_DATA_HOME": "/data"})
    assert (settings.host, settings.port) == ("127.0.0.1", 11434)
    assert settings.home == Path("/data/emberd")
    assert settings.keep_alive_s == 300.0


def test_precedence_is_defaults_file_environment_flags(tmp_path: Path) -> None:
    config = tmp_path / "emberd.toml"
    config.write_text('keep_alive = "10m"\nmax_queue = 7\nnum_ctx = 256\nhost = "0.0.0.0:9000"\n')
    environ = {"EMBERD_CONFIG": str(config), "EMBERD_MAX_QUEUE": "9", "EMBERD_HOME": str(tmp_path / "h")}
    settings = load_settings(environ, overrides={"num_ctx": 128})
    assert settings.keep_alive_s == 600.0  # file
    assert settings.max_queue == 9  # environment over file
    assert settings.num_ctx == 128  # flag over file
    assert (settings.host, settings.port) == ("0.0.0.0", 9000)
    assert settings.home == tmp_path / "h"


@pytest.mark.parametrize(
    ("variable", "value", "field", "expected"),
    [
        ("EMBERD_HOST", "127.0.0.1:8080", "port", 8080),
        ("EMBERD_KEEP_ALIVE", "90", "keep_alive_s", 90.0),
        ("EMBERD_KEEP_ALIVE", "-1", "keep_alive_s", -1.0),
        ("EMBERD_KEEP_ALIVE", "1h", "keep_alive_s", 3600.0),
        ("EMBERD_USE_MMAP", "false", "use_mmap", False),
        ("EMBERD_NUM_GPU", "0", "num_gpu", 0),
        ("EMBERD_BATCH_TOKENS", "128", "batch_tokens", 128),
        ("EMBERD_LOG_LEVEL", "debug", "log_level", "debug"),
        ("EMBERD_SHUTDOWN_TIMEOUT", "5s", "shutdown_timeout_s", 5.0),
    ],
)
def test_every_setting_has_an_environment_variable(variable: str, value: str, field: str, expected: object) -> None:
    assert getattr(load_settings({variable: value}), field) == expected


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"EMBERD_MAX_QUEUE": "lots"}, "max_queue"),
        ({"EMBERD_MAX_QUEUE": "0"}, "max_queue"),
        ({"EMBERD_USE_MMAP": "maybe"}, "use_mmap"),
        ({"EMBERD_KEEP_ALIVE": "5 minutes"}, "keep_alive"),
        ({"EMBERD_HOST": "localhost:http"}, "port"),
        ({"EMBERD_LOG_LEVEL": "loud"}, "log_level"),
        ({"EMBERD_NUM_CTX": "-1"}, "num_ctx"),
    ],
)
def test_bad_values_are_refused_naming_the_setting(environ: dict[str, str], message: str) -> None:
    with pytest.raises(InvalidConfig, match=message):
        load_settings(environ)


def test_unknown_keys_in_the_file_are_refused(tmp_path: Path) -> None:
    config = tmp_path / "emberd.toml"
    config.write_text("keep_alive_seconds = 5\n")
    with pytest.raises(InvalidConfig, match="unknown setting"):
        load_settings({}, config)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:11434", ("127.0.0.1", 11434)),
        ("0.0.0.0", ("0.0.0.0", 11434)),
        (":8080", ("127.0.0.1", 8080)),
        ("[::1]:9000", ("::1", 9000)),
        ("http://localhost:1234/", ("localhost", 1234)),
    ],
)
def test_parse_host(text: str, expected: tuple[str, int]) -> None:
    assert parse_host(text) == expected


@pytest.mark.parametrize(
    ("text", "expected_s"), [("2h45m", 9900.0), ("1.5s", 1.5), ("100us", 1e-4), ("+3m", 180.0), ("-0.5h", -1800.0)]
)
def test_go_durations(text: str, expected_s: float) -> None:
    assert parse_go_duration_s(text) == pytest.approx(expected_s)


def test_settings_are_frozen() -> None:
    with pytest.raises(AttributeError):
        Settings().port = 1  # type: ignore[misc]


def test_huggingface_hub_variables_are_honoured() -> None:
    settings = load_settings({"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "1"})
    assert (settings.hub_endpoint, settings.hub_offline) == ("http://127.0.0.1:9", True)
    assert load_settings({"HF_HUB_OFFLINE": "0"}).hub_offline is False
    assert load_settings({"HF_HUB_OFFLINE": "1", "EMBERD_HUB_OFFLINE": "false"}).hub_offline is False


@pytest.mark.parametrize("path", [config_docs.TOML_PATH, config_docs.PAGE_PATH], ids=lambda path: path.name)
def test_the_documents_are_what_the_declaration_generates(path: Path) -> None:
    """configs/emberd.toml and docs/configuration.md's table come from daemon/config.py's declarations;
    after changing one, `python -m daemon.config_docs --write` writes them again."""
    assert path.read_text(encoding="utf-8") == config_docs.documents()[path], (
        f"{path.name} differs from the declarations: run {config_docs.COMMAND}"
    )


def test_the_table_shows_each_setting_with_its_variable_type_and_default() -> None:
    table = config_docs.render_table()
    for row in [
        "| `EMBERD_KEEP_ALIVE` | duration | `5m` |",
        "| `EMBERD_BODIES_IN_FLIGHT` | size | `128MiB` |",
        "| `EMBERD_MEMORY_RESERVE_MIB` | integer (MiB) | `512` |",
        "| `EMBERD_HUB_OFFLINE` (or `HF_HUB_OFFLINE`) | boolean | `false` |",
        "| `EMBERD_CORS_ORIGINS` | list | none |",
        "| `EMBERD_HOME` | path | `~/.local/share/emberd` |",
    ]:
        assert row in table
    assert "EMBERD_PORT" not in table  # the port is part of EMBERD_HOST


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.0, "0s"), (30.0, "30s"), (120.0, "2m"), (300.0, "5m"), (3600.0, "1h"), (5400.0, "1h30m"),
     (3661.0, "1h1m1s"), (1.5, "1.5s"), (-60.0, "-1m")],
)  # fmt: skip
def test_durations_are_shown_as_people_write_them(seconds: float, text: str) -> None:
    assert format_go_duration(seconds) == text
    assert parse_go_duration_s(text) == seconds


@pytest.mark.parametrize(
    ("size_bytes", "text"),
    [(0, "0"), (1000, "1000"), (1024, "1KiB"), (128 << 20, "128MiB"), (1536 << 20, "1536MiB"), (4 << 30, "4GiB")],
)
def test_sizes_are_shown_in_the_largest_whole_unit(size_bytes: int, text: str) -> None:
    assert format_size(size_bytes) == text
    assert parse_size_bytes(text) == size_bytes


@pytest.mark.parametrize(
    ("variable", "expected"),
    [
        ("EMBERD_BODIES_IN_FLIGHT_BYTES", "did you mean EMBERD_BODIES_IN_FLIGHT?"),
        ("EMBERD_QUICKLANE", "did you mean EMBERD_QUICK_LANE?"),
        ("EMBERD_LOAD_TIMEOUT_S", "did you mean EMBERD_LOAD_TIMEOUT?"),
    ],
)
def test_the_warning_names_the_declared_variable(variable: str, expected: str) -> None:
    """Variables are named by the file's keys (durations without "_s", sizes without "_bytes")."""
    (warning,) = unknown_environment_settings({variable: "1"})
    assert warning.endswith(expected)


@pytest.mark.parametrize("field_name", ["bodies_in_flight_bytes", "keep_alive_s", "port"])
def test_the_file_takes_keys_not_field_names(tmp_path: Path, field_name: str) -> None:
    config = tmp_path / "emberd.toml"
    config.write_text(f"{field_name} = 1\n")
    with pytest.raises(InvalidConfig, match=f"unknown setting '{field_name}'"):
        load_settings({}, config)
